"""Progress bars for Pool.map/imap and Pipeline.results (tqdm when installed).

``track(iterable, total=..., desc=..., status=callable)`` yields the items of
`iterable` unchanged while drawing a bar with items/s; `status`, if given, is
called at most every `every` seconds and its dict is shown after the bar (the
pipelines use it for the fill level of each stage's ring). Without tqdm a
plain line is rewritten on stderr.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Iterable, Iterator, TypeVar

__all__ = ["track"]

T = TypeVar("T")


def track(iterable: Iterable[T], total: int | None = None, desc: str | None = None,
          status: Callable[[], dict[str, Any]] | None = None, every: float = 0.2,
          file: Any = None) -> Iterator[T]:
    """Yield from `iterable`, showing progress. See the module docstring."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    out = file if file is not None else sys.stderr
    last = 0.0
    if tqdm is not None:
        bar = _quiet_tqdm(tqdm)(total=total, desc=desc, unit="it", file=out, dynamic_ncols=True,
                                mininterval=every)
        try:
            for item in iterable:
                bar.update(1)
                if status is not None and time.monotonic() - last >= every:
                    last = time.monotonic()
                    bar.set_postfix(status(), refresh=False)
                yield item
        finally:
            bar.close()
        return
    count = 0
    start = time.monotonic()
    try:
        for item in iterable:
            count += 1
            now = time.monotonic()
            if now - last >= every:
                last = now
                _plain(out, desc, count, total, count / max(now - start, 1e-9), status)
            yield item
    finally:
        _plain(out, desc, count, total, count / max(time.monotonic() - start, 1e-9), status)
        out.write("\n")
        out.flush()


_QUIET: dict[type, type] = {}


def _quiet_tqdm(tqdm: type) -> type:
    """tqdm without its monitor thread: that thread lingers for seconds after
    a bar closes, and a fork in the meantime is a fork of a threaded process
    (Python 3.12+ warns; it can deadlock). Subclassed, so the user's own
    bars keep their setting."""
    if tqdm not in _QUIET:
        _QUIET[tqdm] = type("QuietTqdm", (tqdm,), {"monitor_interval": 0})
    return _QUIET[tqdm]


def _plain(out: Any, desc: str | None, count: int, total: int | None, rate: float,
           status: Callable[[], dict[str, Any]] | None) -> None:
    done = f"{count}/{total}" if total is not None else f"{count}"
    extra = ""
    if status is not None:
        extra = " " + ", ".join(f"{k}={v}" for k, v in status().items())
    out.write(f"\r{desc + ': ' if desc else ''}{done} [{rate:,.0f} it/s]{extra}")
    out.flush()
