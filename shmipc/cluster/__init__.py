"""Running shmipc's Pool and Pipeline on a Ray cluster.

``shmipc.Pool(4, cluster="ray")`` and ``shmipc.Pipeline(source, cluster="ray")``
return the classes of this package instead of the shared-memory ones: the
same methods, the same result and error semantics where Ray allows them,
with the work done by Ray actors anywhere on the cluster. ``cluster`` is:

  * ``None`` (the default): shared memory on this machine (Ray is not used,
    nor imported, whatever the environment says);
  * ``"ray"``: the Ray instance this process already initialised, else the
    cluster named by the ``RAY_ADDRESS`` environment variable, else a new
    local Ray instance (started once, for the life of the process);
  * ``"ray://host:port"`` (Ray Client) or ``"ray:HOST:PORT"`` / ``"ray:auto"``
    (a cluster this machine is part of): that cluster, unless Ray is already
    initialised in this process (then that one is used).

Ray is an optional dependency (``pip install 'shmipc[ray]'``), imported only
when a ``cluster`` is asked for, so ``import shmipc`` costs nothing more.
"""
from __future__ import annotations

import os
from typing import Any

__all__ = ["RayPool", "RayPipeline", "connect", "check_cluster"]

_LAZY = {"RayPool": "shmipc.cluster.ray_pool", "RayPipeline": "shmipc.cluster.ray_pipeline"}


def check_cluster(cluster: Any) -> str | None:
    """The Ray address that `cluster` names (None: Ray's own choice), after
    checking it. Raises ValueError (or TypeError) for anything else."""
    if not isinstance(cluster, str):
        raise TypeError(f"cluster must be None or a string such as 'ray' or 'ray://host:port', "
                        f"got {type(cluster).__name__}")
    if cluster == "ray":
        return None
    if cluster.startswith("ray://") and len(cluster) > len("ray://"):
        return cluster
    if cluster.startswith("ray:") and len(cluster) > len("ray:"):
        return cluster[len("ray:"):]
    raise ValueError(f"cluster must be None, 'ray', 'ray://host:port' or 'ray:ADDRESS', got {cluster!r}")


def connect(cluster: Any) -> Any:
    """Import Ray and make sure this process is connected to the cluster that
    `cluster` names (see the module docstring). Returns the ``ray`` module.

    Raises:
        ImportError: Ray is not installed (with the command that installs it).
        ValueError: `cluster` names no cluster.
    """
    address = check_cluster(cluster)
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"cluster={cluster!r} needs Ray, which is not installed: "
                          f"pip install 'shmipc[ray]' (or 'ray[client]>=2.9')") from exc
    if ray.is_initialized():
        return ray
    if address is None and not os.environ.get("RAY_ADDRESS"):
        # a new local instance: the dashboard is a web server and a few more
        # processes, seconds of start-up that a pool does not need
        ray.init(include_dashboard=False)
    else:
        ray.init(address=address)
    return ray


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'shmipc.cluster' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
