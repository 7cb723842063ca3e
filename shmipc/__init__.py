"""shmipc: fast, crash-proof IPC between a Python parent and its workers,
through shared memory.

    import shmipc, os
    arena = shmipc.Arena(64 << 20)          # shared memory, made before fork
    ring = arena.ring(4 << 20)              # typed messages
    if os.fork() == 0:
        ring.put({"id": 1}); os._exit(0)
    print(ring.get(timeout=5))

The multiprocessing drop-ins (Queue, Pipe, Pool, ...) are imported on first
use, as multiprocessing's context does.
"""
from __future__ import annotations

import importlib
from typing import Any

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

# public name -> module that defines it, imported lazily
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
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'shmipc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
