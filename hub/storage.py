"""Crash-safe file storage for tinydb.

tinydb's default ``JSONStorage`` truncates and rewrites its file in place, so a crash mid-write leaves a torn
file.  ``AtomicJSONStorage`` writes the whole document to a temporary file in the same directory, flushes and
``fsync``s it, renames it over the old file (atomic on POSIX) and ``fsync``s the directory, so after a crash
at any moment the file holds either the old or the new document, and a write that returned is on disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from tinydb.storages import Storage


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    directory = path.parent
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class AtomicJSONStorage(Storage):
    """A tinydb storage that never leaves a half-written file behind."""

    def __init__(self, path: str | os.PathLike[str], **_: Any) -> None:
        self._path = Path(path)
        self._path.parent.mkdir(parents=True, exist_ok=True)

    def read(self) -> dict[str, dict[str, Any]] | None:
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return None
        if not raw.strip():
            return None
        data: dict[str, dict[str, Any]] = json.loads(raw)
        return data

    def write(self, data: dict[str, dict[str, Any]]) -> None:
        atomic_write_bytes(self._path, json.dumps(data, separators=(",", ":"), sort_keys=True).encode())

    def close(self) -> None:
        pass
