"""Map a file, read it and write it through memory, unmap — three ways.

1. ``raw=True``: a plain data file mapped MAP_SHARED; bytes written through
   the mapping reach the file (no arena header, no rings: just memory).
2. ``private=True``: MAP_PRIVATE, copy-on-write: the process sees its
   writes, the file never does.
3. An arena kept in a file: a ring written in one process is still there,
   messages and all, when another process maps the file later.

    .venv/bin/python examples/file_mapping.py
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

import shmipc


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data.txt")
        with open(path, "wb") as f:
            f.write(b"hello, mapped world\n" * 4)

        # 1. shared: writes go to the file
        with shmipc.Arena.from_file(path, raw=True) as mapping:
            print("read through memory:  ", bytes(mapping.buf[:20]))
            mapping.buf[:5] = b"HELLO"
        with open(path, "rb") as f:
            print("the file after unmap: ", f.read(20))

        # 2. private: copy-on-write, the file is untouched
        with shmipc.Arena.from_file(path, private=True, raw=True) as mapping:
            mapping.buf[:5] = b"howdy"
            print("private view:         ", bytes(mapping.buf[:20]))
        with open(path, "rb") as f:
            print("the file, unchanged:  ", f.read(20))

        # 3. an arena in a file outlives the process that wrote it
        arena_path = os.path.join(tmp, "arena.bin")
        with shmipc.Arena.from_file(arena_path, size=1 << 20) as arena:
            ring = arena.ring(64 << 10, name="log")
            ring.put_many([f"entry {i}" for i in range(3)])
        reader = textwrap.dedent(f"""
            import shmipc
            with shmipc.Arena.from_file({arena_path!r}) as arena:
                print("another process reads:", arena.ring(name="log").get_many(10))
        """)
        subprocess.run([sys.executable, "-c", reader], check=True)


if __name__ == "__main__":
    main()
