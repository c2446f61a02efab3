"""Atomic persistence: write a temporary file, fsync it, ``os.replace`` it, fsync the folder.

A reader (or a restart after a power cut) sees either the old file or the new
one, never a torn write.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from device_agent._crashpoint import crashpoint


def fsync_dir(path: Path) -> None:
    """Flush a directory entry change (rename, unlink) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    crashpoint("write")
    tmp.replace(path)
    fsync_dir(path.parent)


def write_json(path: Path, data: Any, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` as indented JSON, atomically."""
    write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), mode=mode)


def read_json(path: Path) -> Any:
    """Read a JSON file written by :func:`write_json`; ``None`` when it does not exist."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
