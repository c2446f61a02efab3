"""Hashing of per-file pieces, shared by the bundle writer and reader.

Both cut the payload stream into segments that may span files; each piece
updates its own file's hasher. Run in a worker thread (hashlib releases the
GIL), in order, while the other thread seals or writes.
"""

from __future__ import annotations

from typing import Any


def hash_pieces(hashers: list[Any], pieces: list[tuple[int, memoryview]]) -> None:
    """Feed each ``(file index, bytes)`` piece to that file's hasher."""
    for index, piece in pieces:
        hashers[index].update(piece)
