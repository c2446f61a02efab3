"""The ``monitoring`` field of format-v2 bundle metadata, checked without numpy.

The device agent's daemon reads bundles but must not load numpy (tests/agent/
test_footprint.py), so this is a pure-Python check of the same shape and bounds as
:func:`edgepack.monitoring.check_reference`; tests/bundle/test_format_v2.py holds the
two to the same verdicts and the same constants.
"""

from __future__ import annotations

import json
import math
from typing import Any

from edgepack.errors import BundleFormatError

REFERENCE_VERSION = 1
BINS = 10
MAX_FEATURES = 512
MAX_CLASSES = 64
MAX_REFERENCE_BYTES = 160 * 1024
THRESHOLD_KEYS = frozenset(
    {"window", "drift_psi", "feature_psi", "anomaly_rate", "confidence_drop", "output_psi"}
)
INPUT_KINDS = ("columns", "channels", "ids")
OUTPUT_KINDS = ("confidence", "norm", "classes")


def _fail(what: str) -> BundleFormatError:
    return BundleFormatError(f"meta/bundle.json: 'monitoring' {what}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _numbers(raw: object, n: int | None, where: str) -> None:
    if not isinstance(raw, list) or (n is not None and len(raw) != n):
        raise _fail(f"{where} must be a list of {n} numbers")
    for v in raw:
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
            raise _fail(f"{where} holds a value that is not a number")


def check_monitoring(doc: object) -> dict[str, Any]:
    """``doc`` if it is a well-formed monitoring reference within the bounds, else BundleFormatError."""
    if not isinstance(doc, dict) or doc.get("format_version") != REFERENCE_VERSION:
        raise _fail(f"is not a format {REFERENCE_VERSION} monitoring reference")
    if doc.get("bins") != BINS:
        raise _fail(f"must have {BINS} bins")
    try:
        size = len(json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False))
    except ValueError:
        raise _fail("holds a value that is not a number") from None
    if size > MAX_REFERENCE_BYTES:
        raise _fail(f"is over {MAX_REFERENCE_BYTES} bytes")
    rows = doc.get("rows")
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise _fail("rows must be a positive integer")
    thresholds = doc.get("thresholds")
    if not isinstance(thresholds, dict) or set(thresholds) - THRESHOLD_KEYS:
        raise _fail("has unknown or missing thresholds")
    _numbers(list(thresholds.values()), None, "thresholds")
    inputs, outputs = doc.get("inputs"), doc.get("outputs")
    if not isinstance(inputs, dict) or not isinstance(outputs, dict):
        raise _fail("inputs and outputs must be objects")
    total = 0
    for name, block in inputs.items():
        if not isinstance(block, dict) or block.get("kind") not in INPUT_KINDS:
            raise _fail(f"input {name!r} has no known kind")
        n, stride = block.get("features"), block.get("stride")
        if not isinstance(n, int) or not isinstance(stride, int) or min(n, stride) < 1:
            raise _fail(f"input {name!r} features/stride")
        total += n
        if total > MAX_FEATURES:
            raise _fail(f"has more than {MAX_FEATURES} features")
        for key, width in (("edges", BINS - 1), ("probs", BINS)):
            rows_of = block.get(key)
            if not isinstance(rows_of, list) or len(rows_of) != n:
                raise _fail(f"input {name!r} {key}")
            for row in rows_of:
                _numbers(row, width, f"input {name!r} {key}")
        for key in ("mean", "std", "min", "max"):
            _numbers(block.get(key), n, f"input {name!r} {key}")
    for name, block in outputs.items():
        if not isinstance(block, dict) or block.get("kind") not in OUTPUT_KINDS:
            raise _fail(f"output {name!r} has no known kind")
        if block["kind"] == "classes":
            classes = block.get("classes")
            if not isinstance(classes, list) or not 0 < len(classes) <= MAX_CLASSES:
                raise _fail(f"output {name!r} classes")
            if not all(_is_int(c) for c in classes):
                raise _fail(f"output {name!r} classes")
            _numbers(block.get("probs"), len(classes), f"output {name!r} probs")
        else:
            _numbers(block.get("edges"), BINS - 1, f"output {name!r} edges")
            _numbers(block.get("probs"), BINS, f"output {name!r} probs")
            _numbers([block.get("mean"), block.get("std")], 2, f"output {name!r} mean/std")
    return doc
