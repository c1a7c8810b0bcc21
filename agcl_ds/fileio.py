"""File writes and hashes shared by checkpoints, saved method state and reports.

Atomic writes: a reader (another rank, a resumed run, a plotting script) sees the old file or the new
one, never half of one. The bytes go to a temporary file beside the target (same folder, so `os.replace`
is a rename within one file system) whose name holds the writer's pid (ranks and processes writing side
by side never share one); it is flushed to disk before the rename, so the rename never publishes a file
whose contents are still in flight.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` in one step (its folder is created if missing)."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, obj: Any, indent: int = 1, sort_keys: bool = False) -> None:
    """`obj` as JSON, written atomically."""
    write_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys).encode())


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks (checkpoint shards do not fit in memory twice)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
