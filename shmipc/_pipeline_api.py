"""What shmipc.Pipeline and its Ray twin (shmipc.cluster.RayPipeline) share:
their arguments and checks, stage naming, and ``results()``. Each keeps its
own engine behind ``_start()``, ``_iterate()`` and ``_fill_levels()``.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

from shmipc._lifetime import Closeable
from shmipc._runtime import check_retries

__all__ = ["PipelineAPI", "StageConfig", "ON_ERROR", "DEFAULT_MAX_INFLIGHT", "check_policy"]

ON_ERROR = ("raise", "skip", "collect")
DEFAULT_MAX_INFLIGHT = 256
# worker processes in one pipeline, all stages together: more is a mistake
# (workers=10**9 used to reach results() and die in a MemoryError building
# the slot table; 10**5 would fork until the machine ran out of pids)
MAX_WORKERS = 4096


class StageConfig:
    """What a stage was declared with (each engine adds its own state)."""

    def __init__(self, index: int, fn: Any, workers: int, ordered: bool, on_error: str,
                 retries: int, name: str) -> None:
        self.index = index
        self.fn = fn
        self.workers = workers
        self.ordered = ordered
        self.on_error = on_error
        self.retries = retries
        self.name = name


class PipelineAPI(Closeable):
    """The common front of a pipeline (see the module docstring)."""

    # set before anything can raise, so close()/__del__ are safe after a failed __init__
    _started = False
    _closed = False
    _iterating = False
    _total: int | None = None
    _stages: list

    def _take_options(self, source: Iterable[Any], max_inflight: Any, on_error: Any, retries: Any,
                      stop_timeout: Any) -> None:
        """Check and keep the constructor's arguments common to both.

        Raises:
            TypeError: `source` is not iterable.
            ValueError: an invalid option (named in the message).
        """
        self._stages = []
        try:
            self._source = iter(source)
        except TypeError:
            raise TypeError(f"source must be iterable, got {type(source).__name__}") from None
        try:
            self._total = len(source)  # type: ignore[arg-type]
        except (TypeError, OverflowError):      # (range(10**20): no len, but fine to iterate)
            self._total = None
        if not isinstance(max_inflight, int) or isinstance(max_inflight, bool) or max_inflight < 1:
            raise ValueError(f"max_inflight must be an int >= 1, got {max_inflight!r}")
        check_policy(on_error)
        check_retries(retries)
        if not isinstance(stop_timeout, (int, float)) or not stop_timeout >= 0:
            raise ValueError(f"stop_timeout must be a number >= 0, got {stop_timeout!r}")
        self._max_inflight = max_inflight
        self._on_error = on_error
        self._retries = retries
        self._stop_timeout = float(stop_timeout)
        #: failures kept by stages with on_error="collect", in arrival order
        self.errors: list = []

    def _stage_options(self, fn: Any, workers: Any, on_error: Any, retries: Any,
                       name: Any) -> tuple[str, int, str]:
        """(on_error, retries, name) of a new stage, defaults filled in.

        Raises:
            TypeError: fn is not callable and has no process().
            ValueError: an invalid option; or the pipeline already started.
        """
        if self._started or self._closed:
            raise ValueError("stages must be added before results() starts the pipeline")
        if not (callable(fn) or callable(getattr(fn, "process", None))):
            raise TypeError(f"a stage must be callable or have a process() method, got {fn!r}")
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        others = sum(st.workers for st in self._stages)
        if others + workers > MAX_WORKERS:
            raise ValueError(f"workers={workers} would make {others + workers} worker processes in this "
                             f"pipeline; at most {MAX_WORKERS}")
        on_error = self._on_error if on_error is None else check_policy(on_error)
        retries = self._retries if retries is None else check_retries(retries)
        if name is None:
            name = getattr(fn, "__name__", None) or type(fn).__name__
            if any(st.name == name for st in self._stages):
                name = f"{name}#{len(self._stages)}"
        elif any(st.name == name for st in self._stages):
            raise ValueError(f"a stage named {name!r} already exists")
        return on_error, retries, str(name)

    # ------------------------------------------------------------ results
    def results(self, progress: bool = False, desc: str | None = None) -> Iterator[Any]:
        """Start the workers and yield the results (in source order unless a
        stage is unordered). Can be called once. Leaving the loop early, or
        an exception, closes the pipeline.

        Args:
            progress: show a progress bar (shmipc.progress.track) with items/s
                and each stage's fill level, so the bottleneck shows.
            desc: the bar's label.

        Raises:
            ValueError: no stages, or results() already called, or closed.
            Whatever a stage raised (on_error="raise"), with the worker's
            traceback as __cause__; WorkerLost for an item whose worker died;
            PipelineError when a stage cannot start.
        """
        if not self._stages:
            raise ValueError("add at least one stage with stage() before results()")
        if self._closed:
            raise ValueError("pipeline is closed")
        if self._iterating:
            raise ValueError("results() can be called only once per pipeline")
        self._iterating = True
        self._start()
        it = self._iterate()
        if not progress:
            return it
        from shmipc.progress import track

        return track(it, total=self._total, desc=desc or "pipeline", status=self._fill_levels)

    def __iter__(self) -> Iterator[Any]:
        return self.results()

    def _start(self) -> None:
        raise NotImplementedError

    def _iterate(self) -> Iterator[Any]:
        raise NotImplementedError

    def _fill_levels(self) -> dict[str, str]:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        return self._closed


def check_policy(on_error: Any) -> str:
    """`on_error` if it is one of ON_ERROR; ValueError otherwise."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return on_error
