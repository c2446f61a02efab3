"""Where monitoring lives on disk, and its figures read back for status, check and report.

``DATA/monitor/NAME/REVISION/reference.json`` is the verified bundle's ``monitoring``
reference, written by the agent at install; ``state.json`` beside it holds the running
counts the application's :class:`device_agent.monitor.MonitoredSession` flushes. One
folder per revision, so a new revision's statistics never mix with an older one's, and
the folder goes with the revision when it is pruned.

Standard library only: the daemon reads summaries here and must not load numpy
(tests/agent/test_footprint.py). ``state.json`` may be written by the application's
user, so everything read from it is checked before it reaches a status or a signed
report.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from device_agent import _atomic
from device_agent.slots import _folder_name, remove_tree
from edgepack.fleetreport import ALERT_KINDS, MAX_ALERTS

MONITOR_DIR = "monitor"
REFERENCE_NAME = "reference.json"
STATE_NAME = "state.json"
STATE_FORMAT = 1
MAX_STATE_BYTES = 4 * 1024 * 1024
"""A larger state file is not read (the largest reference's counts take ~60 KB)."""
# The folder is group-writable: an application in the agent's group, running as its own
# user, flushes state.json into it; reference.json itself is read-only.
FOLDER_MODE = 0o770
REFERENCE_MODE = 0o440

log = logging.getLogger(__name__)


def model_dir(data_dir: Path, name: str) -> Path:
    """``DATA/monitor/NAME``."""
    return data_dir / MONITOR_DIR / _folder_name(name)


def revision_dir(data_dir: Path, name: str, revision: str) -> Path:
    """``DATA/monitor/NAME/REVISION``."""
    return model_dir(data_dir, name) / _folder_name(revision)


def save_reference(data_dir: Path, name: str, revision: str, reference: Mapping[str, Any]) -> None:
    """Keep a verified bundle's monitoring reference for its revision (atomically).

    A state left by an earlier install of the same revision folder is removed: its
    counts belong to that install.
    """
    folder = revision_dir(data_dir, name, revision)
    folder.mkdir(parents=True, exist_ok=True, mode=FOLDER_MODE)
    with contextlib.suppress(OSError):
        folder.chmod(FOLDER_MODE)  # mkdir's mode is cut by the umask
    with contextlib.suppress(FileNotFoundError):
        (folder / STATE_NAME).unlink()
    body = json.dumps(dict(reference), sort_keys=True, separators=(",", ":"), allow_nan=False)
    _atomic.write_bytes(folder / REFERENCE_NAME, body.encode(), mode=REFERENCE_MODE)


def remove_revision(data_dir: Path, name: str, revision: str) -> None:
    """Remove a pruned revision's monitor folder; best effort (a report is not worth a poll)."""
    try:
        remove_tree(revision_dir(data_dir, name, revision), inside=model_dir(data_dir, name))
    except OSError as exc:
        log.warning("%s: could not remove the monitoring state of %s: %s", name, revision, exc)


def load_reference(data_dir: Path, name: str, revision: str) -> dict[str, Any] | None:
    """The reference kept for a revision, or None when its bundle carried none."""
    raw = _read(revision_dir(data_dir, name, revision) / REFERENCE_NAME)
    return raw if isinstance(raw, dict) else None


def _read(path: Path) -> Any:
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_STATE_BYTES + 1)
    except OSError:
        return None
    if len(data) > MAX_STATE_BYTES:
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def _figure(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value):
        return None
    return float(value)


def _alerts(raw: object) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for alert in raw if isinstance(raw, list) else []:
        if not isinstance(alert, dict) or alert.get("kind") not in ALERT_KINDS:
            continue
        entry: dict[str, Any] = {"kind": alert["kind"]}
        for key in ("value", "threshold"):
            number = _figure(alert.get(key))
            if number is not None:
                entry[key] = round(number, 4)
        if isinstance(alert.get("output"), str):
            entry["output"] = alert["output"][:64]
        out.append(entry)
    return out[:MAX_ALERTS]


def summary(data_dir: Path, name: str, revision: str) -> dict[str, Any] | None:
    """The figures of a revision's monitoring, checked; None when it has no state yet.

    ``rows`` and the scores are the last completed window's (null before the first
    one); ``total_rows`` counts the rows folded in since the revision was installed,
    ``seen_calls`` every ``run`` call, sampled or not.
    """
    doc = _read(revision_dir(data_dir, name, revision) / STATE_NAME)
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        return None
    if doc.get("revision") != revision:
        return None
    state = doc.get("state")
    if not isinstance(state, dict):
        return None
    total = state.get("total_rows")
    windows = state.get("windows")
    out: dict[str, Any] = {
        "revision": revision,
        "total_rows": int(total) if isinstance(total, int) and total >= 0 else 0,
        "windows": int(windows) if isinstance(windows, int) and windows >= 0 else 0,
        "seen_calls": seen if isinstance(seen := state.get("seen_calls"), int) and seen >= 0 else 0,
        "updated_at": _figure(doc.get("updated_at")),
        "rows": None,
        "drift_psi": None,
        "max_feature_psi": None,
        "anomaly_rate": None,
        "mean_confidence": None,
        "alerts": [],
    }
    last = state.get("last")
    if isinstance(last, dict):
        rows = last.get("rows")
        out["rows"] = int(rows) if isinstance(rows, int) and rows >= 0 else None
        for key in ("drift_psi", "max_feature_psi", "anomaly_rate"):
            number = _figure(last.get(key))
            out[key] = number if number is not None and number >= 0 else None
        outputs = last.get("outputs")
        for _, entry in sorted(outputs.items()) if isinstance(outputs, dict) else []:
            mean = _figure(entry.get("mean_confidence")) if isinstance(entry, dict) else None
            if mean is not None and mean >= 0:
                out["mean_confidence"] = mean
                break
        out["alerts"] = _alerts(last.get("alerts"))
    return out


CANARY_DEFAULTS = {"window": 500.0, "output_psi": 0.25, "confidence_drop": 0.1}
"""The producer defaults of the thresholds the canary uses, for a reference that lacks
one (edgepack.monitoring.DEFAULT_THRESHOLDS, which this module may not import)."""
_SMOOTH = 0.5  # edgepack.monitoring's additive smoothing


def _psi(observed: list[int], expected: list[float], ref_rows: int) -> float:
    """The smoothed PSI of counts against reference shares, as edgepack.monitoring.psi."""
    bins, n = len(observed), sum(observed)
    total = 0.0
    for count, share in zip(observed, expected, strict=True):
        p = (count + _SMOOTH) / (n + _SMOOTH * bins)
        q = (share * ref_rows + _SMOOTH) / (ref_rows + _SMOOTH * bins)
        total += (p - q) * math.log(p / q)
    return total


def _counts(raw: object, length: int) -> list[int] | None:
    if not isinstance(raw, list) or len(raw) != length:
        return None
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in raw):
        return None
    return list(raw)


def _shares(block: Mapping[str, Any]) -> dict[int, float] | None:
    """A ``classes`` output block's class → share, checked; None when malformed."""
    classes, probs = block.get("classes"), block.get("probs")
    if not isinstance(classes, list) or not isinstance(probs, list) or len(classes) != len(probs):
        return None
    shares: dict[int, float] = {}
    for c, p in zip(classes, probs, strict=True):
        share = _figure(p)
        if isinstance(c, bool) or not isinstance(c, int) or share is None or share < 0:
            return None
        shares[c] = share
    return shares


def canary(
    data_dir: Path,
    name: str,
    revision: str,
    previous: str,
    overrides: Mapping[str, float] | None = None,
) -> dict[str, Any] | None:
    """The running revision's outputs since its install against the PREVIOUS revision's
    reference: the canary comparison that catches a revision which passes its own
    golden check yet predicts differently (a poisoned retraining), which the drift
    scores, measured against the revision's own reference, cannot see.

    For each ``classes`` output both references have, the PSI of the predicted-class
    counts (``total_classes`` in ``state.json``) against the previous reference's class
    shares, over the union of both class lists plus one bin for the classes neither
    lists (a class the running reference does not list is counted there); for a
    single confidence output both have, the mean confidence since install minus the
    previous reference's mean. A comparison is made only over at least ``window`` rows;
    over ``output_psi`` or below ``-confidence_drop`` it is a ``canary`` alert. None
    when either reference or the running state is missing.
    """
    ref, before = load_reference(data_dir, name, revision), load_reference(data_dir, name, previous)
    doc = _read(revision_dir(data_dir, name, revision) / STATE_NAME)
    if ref is None or before is None or not isinstance(doc, dict):
        return None
    state = doc.get("state")
    if doc.get("format") != STATE_FORMAT or doc.get("revision") != revision:
        return None
    if not isinstance(state, dict):
        return None
    outputs, prev_outputs = ref.get("outputs"), before.get("outputs")
    ref_rows = before.get("rows")
    if not isinstance(outputs, dict) or not isinstance(prev_outputs, dict):
        return None
    if isinstance(ref_rows, bool) or not isinstance(ref_rows, int) or ref_rows < 1:
        return None
    own = ref.get("thresholds")
    thresholds = dict(CANARY_DEFAULTS)
    for key in CANARY_DEFAULTS:
        for source in (own if isinstance(own, dict) else {}, overrides or {}):
            number = _figure(source.get(key))
            if number is not None and number > 0:
                thresholds[key] = number
    window = max(1, int(thresholds["window"]))
    where = f"against {previous}'s reference"
    out: dict[str, Any] = {
        "previous": previous,
        "class_psi": {},
        "confidence_shift": None,
        "alerts": [],
    }
    totals = state.get("total_classes")
    for output, block in sorted(outputs.items()):
        prev_block = prev_outputs.get(output)
        if not isinstance(block, dict) or not isinstance(prev_block, dict):
            continue
        if block.get("kind") != "classes" or prev_block.get("kind") != "classes":
            continue
        mine, theirs = _shares(block), _shares(prev_block)
        counted = _counts(
            totals.get(output) if isinstance(totals, dict) else None, len(mine or {}) + 1
        )
        if mine is None or theirs is None or counted is None or sum(counted) < window:
            continue
        by_class = dict(zip(mine, counted, strict=False))
        labels = sorted(set(mine) | set(theirs))
        observed = [by_class.get(c, 0) for c in labels] + [counted[-1]]
        expected = [theirs.get(c, 0.0) for c in labels] + [max(0.0, 1.0 - sum(theirs.values()))]
        value = round(_psi(observed, expected, ref_rows), 4)
        out["class_psi"][output] = value
        if value > thresholds["output_psi"]:
            out["alerts"].append(
                {
                    "kind": "canary",
                    "output": output[:64],
                    "value": value,
                    "threshold": thresholds["output_psi"],
                    "detail": f"predicted-class mix PSI {value} {where}",
                }
            )
    confident = [
        o for o, b in outputs.items() if isinstance(b, dict) and b.get("kind") == "confidence"
    ]
    rows, summed = state.get("total_rows"), _figure(state.get("total_confidence"))
    prev_block = prev_outputs.get(confident[0]) if len(confident) == 1 else None
    prev_mean = _figure(prev_block.get("mean")) if isinstance(prev_block, dict) else None
    if (
        isinstance(prev_block, dict)
        and prev_block.get("kind") == "confidence"
        and prev_mean is not None
        and isinstance(rows, int)
        and not isinstance(rows, bool)
        and rows >= window
        and summed is not None
    ):
        mean = summed / rows
        shift = round(mean - prev_mean, 4)
        out["confidence_shift"] = shift
        if -shift > thresholds["confidence_drop"]:
            out["alerts"].append(
                {
                    "kind": "canary",
                    "output": confident[0][:64],
                    "value": shift,
                    "threshold": -thresholds["confidence_drop"],
                    "detail": f"mean confidence {mean:.4f} {where} {prev_mean:.4f}",
                }
            )
    return out
