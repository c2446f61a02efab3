"""Fuzz target: the bundle metadata parsers (``meta/bundle.json``, ``meta/encryption.json``).

Entry points: :func:`edgepack.bundle.metadata.parse_bundle_json` when the first
byte is even, :func:`~edgepack.bundle.metadata.parse_encryption_json` when it is
odd; the rest of the input is the document. Accepted outcomes: success, or
:class:`~edgepack.errors.BundleFormatError`. Anything else is a finding, and so
is a success whose document does not survive canonical JSON without NaN or
Infinity (``canonical_json`` is how a bundle writes it back).
"""

from __future__ import annotations

import json
from contextlib import nullcontext

import atheris  # type: ignore[import-untyped]  # ships no type hints

from tests.fuzz._common import INSTRUMENTED, reread, run_fuzzer

# Instrument only when fuzzing: a test importing this module runs the code plain.
with atheris.instrument_imports(include=INSTRUMENTED) if __name__ == "__main__" else nullcontext():
    from edgepack.bundle.metadata import (
        canonical_json,
        hpke_info,
        parse_bundle_json,
        parse_encryption_json,
    )
    from edgepack.errors import BundleFormatError

EXPECTED: tuple[type[Exception], ...] = (BundleFormatError,)


def one_input(data: bytes) -> None:
    """Parse ``data[1:]`` as the metadata document ``data[0]`` selects; raise only :data:`EXPECTED`."""
    if not data:
        return
    document = data[1:]
    if data[0] % 2 == 0:
        doc, manifest = parse_bundle_json(document)
        if sum(f.size for f in manifest) != doc["payload"]["size"]:
            raise AssertionError("the manifest's sizes do not add up")
        json.dumps(doc, allow_nan=False)
        if reread(parse_bundle_json, canonical_json(doc), EXPECTED) != (doc, manifest):
            raise AssertionError("bundle.json does not survive canonical JSON")
    else:
        header = parse_encryption_json(document)
        again = reread(parse_encryption_json, header.to_bytes(), EXPECTED)
        if again.to_bytes() != header.to_bytes():
            raise AssertionError("encryption.json does not survive a round trip")
        hpke_info("m", "1", None, header)


def main() -> None:
    """Run libFuzzer with the command line's flags and corpus directories."""
    run_fuzzer(one_input, EXPECTED)


if __name__ == "__main__":
    main()
