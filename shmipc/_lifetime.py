"""A base for objects that own shared memory or processes and must let go of
them: ``close()`` on leaving a ``with`` block, and on garbage collection."""
from __future__ import annotations

from typing import Self


class Closeable:
    """Subclasses define close(), idempotent and safe after a failed __init__
    (set the attributes close() reads before anything can raise)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
