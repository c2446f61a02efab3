"""Fuzz target: the bundle container reader, up to where a key would be needed.

Entry point: :func:`edgepack.bundle._container.read_members` and
:func:`edgepack.bundle.reader.read_info` on a file holding the input, as it is
and with its header checksums fixed (the ustar walk, the member bounds, the
metadata parsers, the payload size check), then ``BundleInfo.summary()`` as
``edgepack inspect --json`` prints it. Accepted outcomes: success, or
:class:`~edgepack.errors.BundleFormatError`. Anything else is a finding, and so
is a member of negative size or outside the file, or a success whose summary
cannot be printed as strict JSON.
"""

from __future__ import annotations

import contextlib
import io
import json
from contextlib import nullcontext

import atheris  # type: ignore[import-untyped]  # ships no type hints

from tests.fuzz._common import INSTRUMENTED, run_fuzzer, scratch_dir

# Instrument only when fuzzing: a test importing this module runs the code plain.
with atheris.instrument_imports(include=INSTRUMENTED) if __name__ == "__main__" else nullcontext():
    from edgepack.bundle import _container
    from edgepack.bundle.metadata import MEMBER_ORDER
    from edgepack.bundle.reader import read_info
    from edgepack.errors import BundleFormatError

EXPECTED: tuple[type[Exception], ...] = (BundleFormatError,)
_PATH = scratch_dir() / "bundle.epk"


def with_checksums(data: bytes) -> bytes:
    """``data`` with the checksum of every block that looks like a ustar header made right.

    Random mutations almost never keep a header's checksum valid; fixing it lets
    the fuzzer reach the checks behind it (sizes, names, order, metadata).
    """
    fixed = bytearray(data)
    for start in range(0, len(fixed) - _container.BLOCK + 1, _container.BLOCK):
        block = fixed[start : start + _container.BLOCK]
        if block[257:265] == b"ustar\x0000":
            checksum = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
            fixed[start + 148 : start + 156] = f"{checksum:06o}".encode() + b"\x00 "
    return bytes(fixed)


def _read(data: bytes) -> None:
    members = _container.read_members(io.BytesIO(data), len(data), MEMBER_ORDER, {})
    for member in members:
        if member.size < 0 or member.offset + member.size > len(data):
            raise AssertionError(f"member {member.name!r} has an impossible size {member.size}")
    _PATH.write_bytes(data)
    info = read_info(_PATH)
    if info.payload_offset + info.payload_length > len(data):
        raise AssertionError("the payload lies outside the file")
    json.dumps(info.summary(), allow_nan=False)


def one_input(data: bytes) -> None:
    """Read ``data``, and ``data`` with its header checksums fixed, as bundle files.

    Raises only :data:`EXPECTED`.
    """
    with contextlib.suppress(*EXPECTED):
        _read(with_checksums(data))
    _read(data)


def main() -> None:
    """Run libFuzzer with the command line's flags and corpus directories."""
    run_fuzzer(one_input, EXPECTED)


if __name__ == "__main__":
    main()
