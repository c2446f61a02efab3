"""Tools to take a bundle apart and put it back together with one thing changed.

The container's own header writer is used so checksums stay valid: each
tamper test then reaches the defence it is aimed at instead of failing early.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgepack.bundle import _container
from edgepack.bundle.reader import read_info

MEMBERS = (
    "meta/encryption.json",
    "payload.enc",
    "meta/bundle.json",
    "meta/signature.sigstore.json",
)


def split(path: Path) -> list[tuple[str, bytes]]:
    """The bundle's members, in order."""
    data = path.read_bytes()
    members: list[tuple[str, bytes]] = []
    offset = 0
    while True:
        header = data[offset : offset + 512]
        if header == bytes(512):
            return members
        member = _container.parse_header(header, offset)
        assert member is not None
        members.append((member.name, data[member.offset : member.offset + member.size]))
        offset = member.offset + member.size + _container.padding(member.size)


def raw_header(name: str, size: int, kind: bytes = b"0") -> bytes:
    """A ustar header with any name and type (our writer only makes regular files)."""
    header = bytearray(_container.member_header("x", size))
    header[0:100] = name.encode().ljust(100, b"\x00")[:100]
    header[156:157] = kind
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}".encode() + b"\x00 "
    return bytes(header)


def join(members: list[tuple[str, bytes]], kinds: dict[int, bytes] | None = None) -> bytes:
    """Reassemble members into a container (optionally with odd entry types)."""
    out = bytearray()
    for index, (name, data) in enumerate(members):
        out += raw_header(name, len(data), (kinds or {}).get(index, b"0"))
        out += data + bytes(_container.padding(len(data)))
    return bytes(out + _container.end_of_archive())


def replace(path: Path, name: str, data: bytes, out: Path | None = None) -> Path:
    """Write a copy of the bundle with member ``name`` replaced by ``data``."""
    members = [(n, data if n == name else d) for n, d in split(path)]
    target = out or path.with_name("tampered-" + path.name)
    target.write_bytes(join(members))
    return target


def edit_json(path: Path, name: str, change: Any) -> Path:
    """Write a copy with the JSON member ``name`` changed by ``change(doc)``."""
    doc = dict(split(path))[name]
    parsed = json.loads(doc)
    change(parsed)
    return replace(path, name, json.dumps(parsed, indent=2, sort_keys=True).encode() + b"\n")


def payload_segments(path: Path) -> list[tuple[int, int]]:
    """(absolute offset, length) of each ciphertext segment in the file."""
    info = read_info(path)
    seg = info.encryption.segment_size + 16
    offsets = []
    position = 0
    while position < info.payload_length:
        length = min(seg, info.payload_length - position)
        offsets.append((info.payload_offset + position, length))
        position += length
    return offsets


def flip(path: Path, offset: int, out: Path | None = None) -> Path:
    """Write a copy with one bit flipped at ``offset``."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    target = out or path.with_name("flipped-" + path.name)
    target.write_bytes(bytes(data))
    return target
