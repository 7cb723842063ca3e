"""shmipc: fast, crash-proof IPC between a Python parent and its workers,
through shared memory.

    import shmipc, os
    arena = shmipc.Arena(64 << 20)          # shared memory, made before fork
    ring = arena.ring(4 << 20)              # typed messages
    if os.fork() == 0:
        ring.put({"id": 1}); os._exit(0)
    print(ring.get(timeout=5))

``import shmipc as multiprocessing`` runs multiprocessing programs unchanged:
the module offers every top-level name multiprocessing does, with the same
signatures. Queue, SimpleQueue, JoinableQueue, Pipe, Pool and get_context
are shmipc's (through shared memory); everything else (Process, Lock, Event,
Value, Array, Manager, set_start_method, cpu_count, TimeoutError, ...) *is*
multiprocessing's object, so it works with shmipc's queues and pipes under
every start method, and shmipc and multiprocessing share one default start
method. Everything beyond the arena and ring is imported on first use, as
multiprocessing's context does, so ``import shmipc`` stays cheap (it does not
import multiprocessing).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from shmipc._ring import MessageView, Ring
from shmipc.arena import Arena, ArenaFull, Region
from shmipc.errors import (
    ArenaClosed,
    CorruptArena,
    CorruptMessage,
    MessageTooLarge,
    PeerDied,
    RingClosed,
    ShmipcError,
    WorkerLost,
)

__version__ = "0.1.0"

# shmipc's own public names -> the module that defines them, imported lazily
_LAZY = {
    "Queue": "shmipc.queues",
    "SimpleQueue": "shmipc.queues",
    "JoinableQueue": "shmipc.queues",
    "Pipe": "shmipc.connection",
    "Connection": "shmipc.connection",
    "Pool": "shmipc.pool",
    "AsyncResult": "shmipc.pool",
    "ProcessPoolExecutor": "shmipc.futures",
    "get_context": "shmipc.context",
    "Pipeline": "shmipc.pipeline",
}

# multiprocessing's top-level names that shmipc has nothing better for: the
# very same objects, fetched from multiprocessing on first use (its __all__
# on 3.11-3.14, less what shmipc defines above)
_FROM_MULTIPROCESSING = (
    "Array", "AuthenticationError", "Barrier", "BoundedSemaphore", "BufferTooShort",
    "Condition", "Event", "Lock", "Manager", "Process", "ProcessError", "RLock",
    "RawArray", "RawValue", "Semaphore", "TimeoutError", "Value", "active_children",
    "allow_connection_pickling", "cpu_count", "current_process", "freeze_support",
    "get_all_start_methods", "get_logger", "get_start_method", "log_to_stderr",
    "parent_process", "reducer", "set_executable", "set_forkserver_preload",
    "set_start_method",
)

# submodules reachable as attributes: shmipc's own, else multiprocessing's
# (``mp.managers.BaseManager``, ``mp.shared_memory.SharedMemory``)
_OWN_SUBMODULES = frozenset({"arena", "connection", "context", "errors", "futures",
                             "pipeline", "pool", "progress", "queues"})
_MP_SUBMODULES = frozenset({"dummy", "heap", "managers", "process", "reduction",
                            "resource_sharer", "resource_tracker", "shared_memory",
                            "sharedctypes", "spawn", "synchronize", "util"})

if TYPE_CHECKING:
    # what the lazy names really are, for mypy and pyright (at run time the
    # module __getattr__ below provides them)
    from multiprocessing import (
        Array as Array,
        AuthenticationError as AuthenticationError,
        Barrier as Barrier,
        BoundedSemaphore as BoundedSemaphore,
        BufferTooShort as BufferTooShort,
        Condition as Condition,
        Event as Event,
        Lock as Lock,
        Manager as Manager,
        Process as Process,
        ProcessError as ProcessError,
        RLock as RLock,
        RawArray as RawArray,
        RawValue as RawValue,
        Semaphore as Semaphore,
        TimeoutError as TimeoutError,
        Value as Value,
        active_children as active_children,
        allow_connection_pickling as allow_connection_pickling,
        cpu_count as cpu_count,
        current_process as current_process,
        freeze_support as freeze_support,
        get_all_start_methods as get_all_start_methods,
        get_logger as get_logger,
        get_start_method as get_start_method,
        log_to_stderr as log_to_stderr,
        parent_process as parent_process,
        reducer as reducer,
        set_executable as set_executable,
        set_forkserver_preload as set_forkserver_preload,
        set_start_method as set_start_method,
    )

    from shmipc.connection import Connection as Connection, Pipe as Pipe
    from shmipc.context import get_context as get_context
    from shmipc.futures import ProcessPoolExecutor as ProcessPoolExecutor
    from shmipc.pipeline import Pipeline as Pipeline
    from shmipc.pool import AsyncResult as AsyncResult, Pool as Pool
    from shmipc.queues import (
        JoinableQueue as JoinableQueue,
        Queue as Queue,
        SimpleQueue as SimpleQueue,
    )

__all__ = [
    "Arena",
    "ArenaClosed",
    "ArenaFull",
    "CorruptArena",
    "CorruptMessage",
    "MessageTooLarge",
    "MessageView",
    "PeerDied",
    "Region",
    "Ring",
    "RingClosed",
    "ShmipcError",
    "WorkerLost",
    *_LAZY,
    *_FROM_MULTIPROCESSING,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    elif name in _FROM_MULTIPROCESSING:
        value = getattr(importlib.import_module("multiprocessing"), name)
    elif name in _OWN_SUBMODULES:
        value = importlib.import_module(f"shmipc.{name}")
    elif name in _MP_SUBMODULES:
        value = importlib.import_module(f"multiprocessing.{name}")
    else:
        raise AttributeError(f"module 'shmipc' has no attribute {name!r}")
    if name != "reducer":       # a property of multiprocessing's context: read it each time
        globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_FROM_MULTIPROCESSING))
