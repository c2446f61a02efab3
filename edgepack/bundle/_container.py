"""The bundle's outer container: a strict, deterministic subset of POSIX ustar.

A bundle is a tar file so ordinary tools can look into it (``tar tvf``,
``tar xOf BUNDLE meta/bundle.json``), but we read and write it ourselves:
Python's ``tarfile`` accepts far more than a bundle may hold (links, devices,
PAX and GNU extensions, absolute names). The reader accepts only regular-file
members with the expected names, in the expected order, each once, with sane
sizes, followed by zero blocks and nothing else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import BinaryIO

from edgepack.errors import BundleFormatError

BLOCK = 512
_USTAR_MAGIC = b"ustar\x0000"
_MAX_OCTAL_SIZE = 0o77777777777
_OCTAL_DIGITS = re.compile(rb"[0-7]+")
_REGULAR = (b"0", b"\x00")
_TYPE_NAMES = {
    b"1": "a hard link",
    b"2": "a symbolic link",
    b"3": "a character device",
    b"4": "a block device",
    b"5": "a directory",
    b"6": "a FIFO",
    b"7": "a contiguous file",
    b"x": "a PAX extended header",
    b"g": "a PAX global header",
    b"L": "a GNU long name",
    b"K": "a GNU long link name",
}


def padding(size: int) -> int:
    """Bytes of zero padding after a member of ``size`` bytes."""
    return -size % BLOCK


def _octal(value: int, width: int) -> bytes:
    return f"{value:0{width - 1}o}".encode() + b"\x00"


def _size_field(size: int) -> bytes:
    if size <= _MAX_OCTAL_SIZE:
        return _octal(size, 12)
    # GNU base-256 encoding for members of 8 GiB and more (multi-GiB payloads).
    return b"\x80" + size.to_bytes(11, "big")


def member_header(name: str, size: int) -> bytes:
    """A deterministic ustar header: mode 0644, owner 0:0, mtime 0, no user names."""
    raw_name = name.encode()
    if len(raw_name) > 100:
        raise ValueError("member name too long")
    header = bytearray(BLOCK)
    header[0 : len(raw_name)] = raw_name
    header[100:108] = _octal(0o644, 8)
    header[108:116] = _octal(0, 8)
    header[116:124] = _octal(0, 8)
    header[124:136] = _size_field(size)
    header[136:148] = _octal(0, 12)
    header[148:156] = b" " * 8
    header[156:157] = b"0"
    header[257:265] = _USTAR_MAGIC
    checksum = sum(header)
    header[148:156] = f"{checksum:06o}".encode() + b"\x00 "
    return bytes(header)


def end_of_archive() -> bytes:
    """Two zero blocks close a tar archive."""
    return bytes(2 * BLOCK)


@dataclass(frozen=True)
class Member:
    """One member found by the reader: its name, where its data starts, its size."""

    name: str
    offset: int
    size: int


def _parse_number(field: bytes, what: str) -> int:
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    text = field.rstrip(b"\x00 ").lstrip(b" ")
    if not text:
        return 0
    # Octal digits only: int() would also take a sign, underscores and inner spaces,
    # so "-1" would give a member of negative size.
    if not _OCTAL_DIGITS.fullmatch(text):
        raise BundleFormatError(f"corrupt container header: bad {what} field")
    return int(text, 8)


def check_member_name(name: str) -> None:
    """Refuse names a bundle member may never have, with a precise reason."""
    if not name:
        raise BundleFormatError("container entry with an empty name")
    if name.startswith("/"):
        raise BundleFormatError(f"container entry {name!r} has an absolute path")
    parts = name.split("/")
    if ".." in parts:
        raise BundleFormatError(f"container entry {name!r} contains '..'")
    if "\\" in name or "\x00" in name or "" in parts or "." in parts:
        raise BundleFormatError(f"container entry {name!r} is not a normalised relative path")


def parse_header(block: bytes, offset: int) -> Member | None:
    """Parse one header block; ``None`` for a zero block (end of archive)."""
    if len(block) != BLOCK:
        raise BundleFormatError("the bundle is truncated (incomplete container header)")
    if block == bytes(BLOCK):
        return None
    if block[257:265] != _USTAR_MAGIC:
        raise BundleFormatError("not an edgepack bundle (no ustar container header)")
    stored = _parse_number(block[148:156], "checksum")
    computed = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    if stored != computed:
        raise BundleFormatError("corrupt container header (checksum mismatch)")
    name = block[0:100].split(b"\x00", 1)[0].decode("utf-8", "replace")
    # The writer never splits a name into ustar's prefix field; GNU tar and we would
    # join one differently, so a bundle that uses it is refused rather than read.
    if block[345:500].strip(b"\x00"):
        raise BundleFormatError("corrupt container header: the ustar prefix field is used")
    kind = block[156:157]
    if kind not in _REGULAR:
        what = _TYPE_NAMES.get(kind, f"an entry of type {kind!r}")
        raise BundleFormatError(
            f"container entry {name!r} is {what}; bundles hold regular files only"
        )
    check_member_name(name)
    size = _parse_number(block[124:136], "size")
    return Member(name=name, offset=offset + BLOCK, size=size)


def read_members(
    handle: BinaryIO, file_size: int, expected: tuple[str, ...], max_sizes: dict[str, int]
) -> list[Member]:
    """Walk the container and return its members, enforcing the exact layout.

    ``expected`` is the required order of member names; ``max_sizes`` bounds
    each member (the payload's bound is the file size itself).
    """
    members: list[Member] = []
    seen: set[str] = set()
    offset = 0
    while True:
        handle.seek(offset)
        block = handle.read(BLOCK)
        if offset == 0 and (len(block) < BLOCK or block[257:265] != _USTAR_MAGIC):
            raise BundleFormatError(
                "not an edgepack bundle (no container header at the start of the file)"
            )
        member = parse_header(block, offset)
        if member is None:
            break
        if member.name in seen:
            raise BundleFormatError(f"duplicate container entry {member.name!r}")
        seen.add(member.name)
        if len(members) >= len(expected):
            raise BundleFormatError(f"too many container entries (a bundle has {len(expected)})")
        if member.name != expected[len(members)]:
            if member.name in expected:
                raise BundleFormatError(f"container entry {member.name!r} is out of order")
            raise BundleFormatError(
                f"unexpected container entry {member.name!r} (not part of the bundle format)"
            )
        limit = max_sizes.get(member.name, file_size)
        if member.size > limit:
            raise BundleFormatError(
                f"container entry {member.name!r} is oversize ({member.size} bytes)"
            )
        end = member.offset + member.size + padding(member.size)
        if end > file_size:
            raise BundleFormatError("the bundle is truncated")
        handle.seek(member.offset + member.size)
        if handle.read(padding(member.size)) != bytes(padding(member.size)):
            raise BundleFormatError(f"container entry {member.name!r} has non-zero padding")
        members.append(member)
        offset = end
    if len(members) != len(expected):
        missing = expected[len(members)]
        raise BundleFormatError(f"the bundle is incomplete: entry {missing!r} is missing")
    # After the members: zero blocks only, and at least the two that close the archive.
    trailer = file_size - offset
    if trailer < 2 * BLOCK:
        raise BundleFormatError("the bundle is truncated (no end-of-archive marker)")
    if trailer > 64 * BLOCK:
        raise BundleFormatError("unexpected data after the end of the bundle")
    handle.seek(offset)
    if handle.read(trailer) != bytes(trailer):
        raise BundleFormatError("unexpected data after the end of the bundle")
    return members
