"""Fuzz target: the channel document parser, as the device agent calls it.

Entry point: :func:`device_agent.selection.parse_for` (which calls
:func:`edgepack.channel.parse_channel`) on the input, then the agent's
:func:`~device_agent.selection.select` for a few devices. Accepted outcomes:
success, or :class:`~edgepack.errors.InvalidInputError`. Anything else is a
finding, and so is a parsed document that does not survive ``to_bytes`` and a
second parse unchanged (the repository writes what the agent reads).
"""

from __future__ import annotations

from contextlib import nullcontext

import atheris  # type: ignore[import-untyped]  # ships no type hints

from tests.fuzz._common import INSTRUMENTED, reread, run_fuzzer

# Instrument only when fuzzing: a test importing this module runs the code plain.
with atheris.instrument_imports(include=INSTRUMENTED) if __name__ == "__main__" else nullcontext():
    from device_agent.selection import Device, parse_for, select
    from edgepack.channel import parse_channel
    from edgepack.errors import InvalidInputError

EXPECTED: tuple[type[Exception], ...] = (InvalidInputError,)
_DEVICES = (
    Device("dev-0123456789abcdef0123", "aarch64", "raspberry-pi-5", None),
    Device("dev-fedcba9876543210fedc", "x86_64", None, "canary"),
    Device("dev-00000000000000000000", "aarch64", "any", "beta-testers"),
)


def one_input(data: bytes) -> None:
    """Parse ``data`` as a channel document and select from it; raise only :data:`EXPECTED`."""
    doc = parse_channel(data)
    parse_for(data, doc.model, doc.channel, doc.sequence)
    again = reread(parse_channel, doc.to_bytes(), EXPECTED)
    if again != doc or again.to_bytes() != doc.to_bytes():
        raise AssertionError("a channel document does not survive to_bytes and parse")
    for device in _DEVICES:
        selection = select(doc, device)
        if selection.ok and selection.version in doc.revoked:
            raise AssertionError("selection chose a revoked release")


def main() -> None:
    """Run libFuzzer with the command line's flags and corpus directories."""
    run_fuzzer(one_input, EXPECTED)


if __name__ == "__main__":
    main()
