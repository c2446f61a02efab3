"""Model monitoring: a reference profile recorded at build time, running statistics of the
same shape on the device, and the drift, anomaly and confidence scores between the two.

The builder calls :func:`build_reference` on the validation (or calibration) inputs and
the final model's outputs; the result is signed metadata in the bundle. On the device,
:class:`Monitor` folds each inference's inputs and outputs into fixed-size counts (no
raw value is kept), and every ``window`` rows scores the window against the reference:

* **drift**: the population stability index (PSI) of each input feature's histogram,
  over the reference's own decile edges (10 bins), with additive smoothing. PSI is
  symmetric, bounded for smoothed counts, needs only the counts both sides already
  keep (a Kolmogorov–Smirnov test needs the sorted samples, which the device must
  not keep), and its null distribution is known: about (bins − 1)·(1/n + 1/N) for n
  window rows and N reference rows, so the thresholds are set well above it;
* **anomalies**: the share of rows with a value outside the reference's range
  (widened by a tolerance of a tenth of the range);
* **confidence**: for a classifier's probability output, the window's mean top-1
  probability against the reference's, and the PSI of its histogram; for other float
  outputs (embeddings, regressions), the PSI of the row norm; for integer outputs
  (labels), the PSI of the predicted classes (a poisoned model shifts what it predicts).

Feature kinds per input: ``columns`` (one feature per value of a row, up to
:data:`MAX_COLUMNS`), ``channels`` (images and other wide tensors: one feature per
channel, values sampled with a fixed stride), ``ids`` (integer inputs such as token
ids: one feature over the id values, and ids above the reference's largest count as
anomalies). The reference's size is bounded: at most :data:`MAX_FEATURES` features in
all, :data:`MAX_REFERENCE_BYTES` of canonical JSON.

Pure numpy: the builder and the device agent share it.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgepack.errors import InvalidInputError

FORMAT_VERSION = 1
BINS = 10
MAX_COLUMNS = 256
"""An input with more values per row is summarised per channel (or as a whole)."""
MAX_FEATURES = 512
MAX_CHANNELS = 64
MAX_CLASSES = 64
MAX_REFERENCE_BYTES = 160 * 1024
SAMPLES_PER_FEATURE = 1024
"""Values sampled per channel feature and row (a fixed stride), bounding the device's cost."""
RANGE_TOLERANCE = 0.1
DEFAULT_THRESHOLDS: dict[str, float] = {
    "window": 500,
    "drift_psi": 0.2,
    "feature_psi": 1.0,
    "anomaly_rate": 0.05,
    "confidence_drop": 0.1,
    "output_psi": 0.25,
}
"""The producer's defaults; a bundle may carry its own, a device's config overrides them."""
_SMOOTH = 0.5
BUFFER_ROWS = 64
"""Rows buffered before one vectorised fold (a per-call fold costs more than a small inference)."""
BUFFER_VALUES = 64 * 1024
"""An input or output with more values per row than this ÷ BUFFER_ROWS is folded per call."""
OVERHEAD_BUDGET = 0.02
"""The share of inference time the monitor's own measured work may take when sampling.
Below the issue's 5 % goal: a skipped call's counter costs about 0.2 µs, 2 % of the digits MLP."""
ADAPT_EVERY = 256
"""Taken calls between two updates of the sampling stride (spans several buffer folds)."""
MAX_STRIDE = 1024


def _round(values: Any) -> list[float]:
    return [float(f"{float(v):.5g}") for v in np.asarray(values, dtype=np.float64).ravel()]


@dataclass(frozen=True)
class _Shape:
    kind: str  # columns | channels | ids
    features: int
    stride: int


def _shape_of(array: np.ndarray) -> _Shape:
    """How an input of this array's shape is summarised (decided from the reference data)."""
    rows = array.shape[0] if array.ndim else 1
    per_row = int(array.size // max(rows, 1))
    if array.dtype.kind in "iub":
        return _Shape("ids", 1, max(1, math.ceil(per_row / SAMPLES_PER_FEATURE)))
    if per_row <= MAX_COLUMNS:
        return _Shape("columns", per_row, 1)
    if array.ndim >= 3 and 1 <= array.shape[1] <= MAX_CHANNELS:
        spatial = per_row // array.shape[1]
        return _Shape(
            "channels", int(array.shape[1]), max(1, math.ceil(spatial / SAMPLES_PER_FEATURE))
        )
    return _Shape("channels", 1, max(1, math.ceil(per_row / SAMPLES_PER_FEATURE)))


def _values(array: np.ndarray, shape: _Shape) -> np.ndarray:
    """(features, values) of one batch: the values each feature's histogram counts."""
    rows = array.shape[0] if array.ndim else 1
    flat = np.asarray(array).reshape(rows, -1).astype(np.float64, copy=False)
    if shape.kind == "columns":
        if flat.shape[1] != shape.features:
            raise InvalidInputError(
                f"an input has {flat.shape[1]} values per row, the reference {shape.features}"
            )
        return flat.T
    per = flat.reshape(rows, shape.features, -1)[:, :, :: shape.stride]
    return per.transpose(1, 0, 2).reshape(shape.features, -1)


def _bins(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index of each value: the number of edges strictly below it (0 … BINS-1).

    Repeated edges (a feature that is mostly one value) are fine: a value equal to
    the repeated edge falls below all of them, so a constant-0 pixel's reference is
    all in bin 0 and any brighter value moves to another bin.
    """
    return np.asarray((values[:, :, None] > edges[:, None, :]).sum(axis=2))


def _counts(bins: np.ndarray) -> np.ndarray:
    features = bins.shape[0]
    offsets = (np.arange(features)[:, None] * BINS + bins).ravel()
    return np.bincount(offsets, minlength=features * BINS).reshape(features, BINS)


def _histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(features, BINS) counts of ``values`` (features, n) over ``edges``, as :func:`_bins`
    then :func:`_counts` would give, from the count of values above each edge (one
    vectorised comparison; about three times faster than binning each value)."""
    above = np.count_nonzero(values[None, :, :] > edges.T[:, :, None], axis=2)
    cumulative = np.zeros((BINS + 1, values.shape[0]), dtype=np.int64)
    cumulative[0] = values.shape[1]
    cumulative[1:BINS] = above
    return np.asarray((cumulative[:-1] - cumulative[1:]).T)


def _feature_block(values: np.ndarray) -> dict[str, Any]:
    """Edges (deciles), bin probabilities, mean, std, min, max of each feature's values."""
    qs = np.linspace(0, 1, BINS + 1)[1:-1]
    edges = np.quantile(values, qs, axis=1).T  # (features, BINS-1)
    counts = _counts(_bins(values, edges))
    total = max(1, values.shape[1])
    return {
        "edges": [_round(e) for e in edges],
        "probs": [_round(c / total) for c in counts],
        "mean": _round(values.mean(axis=1)),
        "std": _round(values.std(axis=1)),
        "min": _round(values.min(axis=1)),
        "max": _round(values.max(axis=1)),
    }


def _is_probabilities(array: np.ndarray) -> bool:
    if array.dtype.kind != "f" or array.ndim != 2 or array.shape[1] < 2 or not array.size:
        return False
    sums = array.sum(axis=1)
    return bool(
        np.all(array >= -1e-4) and np.all(array <= 1 + 1e-4) and np.allclose(sums, 1, atol=1e-2)
    )


def _output_values(array: np.ndarray, kind: str) -> np.ndarray:
    """The one value per row an output's histogram counts."""
    rows = array.shape[0] if array.ndim else 1
    flat = np.asarray(array).reshape(rows, -1).astype(np.float64, copy=False)
    if kind == "confidence":
        return np.asarray(flat.max(axis=1))
    if kind == "classes":
        return np.asarray(flat[:, 0])
    return np.asarray(np.sqrt((flat * flat).sum(axis=1)))


def _output_kind(array: np.ndarray) -> str | None:
    if array.dtype.kind in "iu" and array.size:
        return "classes"
    if _is_probabilities(array):
        return "confidence"
    if array.dtype.kind == "f" and array.size:
        return "norm"
    return None


def build_reference(
    inputs: Mapping[str, np.ndarray],
    outputs: Mapping[str, np.ndarray],
    thresholds: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The reference profile of ``inputs`` (name → all rows) and the model's ``outputs``.

    No raw sample goes into it: only decile edges, bin shares and moments per feature.
    Raises InvalidInputError when there are no rows, or the result would exceed the bound.
    """
    rows = 0
    doc_inputs: dict[str, Any] = {}
    features = 0
    for name, array in sorted(inputs.items()):
        array = np.asarray(array)
        if array.ndim == 0 or array.shape[0] == 0:
            raise InvalidInputError(f"no reference rows for input {name!r}")
        rows = max(rows, int(array.shape[0]))
        shape = _shape_of(array)
        features += shape.features
        if features > MAX_FEATURES:
            raise InvalidInputError(
                f"the monitoring reference would have more than {MAX_FEATURES} features"
            )
        block = _feature_block(_values(array, shape))
        doc_inputs[name] = {
            "kind": shape.kind,
            "features": shape.features,
            "stride": shape.stride,
            **block,
        }
    doc_outputs: dict[str, Any] = {}
    for name, array in sorted(outputs.items()):
        array = np.asarray(array)
        kind = _output_kind(array)
        if kind is None:
            continue
        values = _output_values(array, kind)
        if kind == "classes":
            classes, counts = np.unique(values.astype(np.int64), return_counts=True)
            order = np.argsort(-counts, kind="stable")[:MAX_CLASSES]
            kept = sorted(int(c) for c in classes[order])
            shares = [float(counts[np.searchsorted(classes, c)]) / len(values) for c in kept]
            doc_outputs[name] = {"kind": kind, "classes": kept, "probs": _round(shares)}
            continue
        block = _feature_block(values[None, :])
        doc_outputs[name] = {
            "kind": kind,
            "edges": block["edges"][0],
            "probs": block["probs"][0],
            "mean": block["mean"][0],
            "std": block["std"][0],
        }
    merged = dict(DEFAULT_THRESHOLDS)
    merged.update({k: float(v) for k, v in (thresholds or {}).items()})
    doc = {
        "format_version": FORMAT_VERSION,
        "bins": BINS,
        "rows": rows,
        "inputs": doc_inputs,
        "outputs": doc_outputs,
        "thresholds": merged,
    }
    size = len(canonical(doc))
    if size > MAX_REFERENCE_BYTES:
        raise InvalidInputError(
            f"the monitoring reference is {size} bytes, over the {MAX_REFERENCE_BYTES} bound"
        )
    return doc


def canonical(doc: Mapping[str, Any]) -> bytes:
    """Sorted keys, no spaces, no NaN: the reference's bytes in the bundle's metadata."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _floats(raw: object, n: int | None, where: str) -> np.ndarray:
    if not isinstance(raw, list) or (n is not None and len(raw) != n):
        raise InvalidInputError(f"monitoring reference: {where} must be a list of {n} numbers")
    if not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in raw
    ):
        raise InvalidInputError(f"monitoring reference: {where} holds a value that is not a number")
    return np.asarray(raw, dtype=np.float64)


def check_reference(doc: object) -> dict[str, Any]:
    """``doc`` if it is a well-formed reference within the bounds; else InvalidInputError."""
    if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION:
        raise InvalidInputError("the monitoring reference is not format 1")
    if doc.get("bins") != BINS:
        raise InvalidInputError(f"the monitoring reference must have {BINS} bins")
    if len(canonical(doc)) > MAX_REFERENCE_BYTES:
        raise InvalidInputError(f"the monitoring reference is over {MAX_REFERENCE_BYTES} bytes")
    rows = doc.get("rows")
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
        raise InvalidInputError("monitoring reference: rows must be a positive integer")
    thresholds = doc.get("thresholds")
    if not isinstance(thresholds, dict) or set(thresholds) - set(DEFAULT_THRESHOLDS):
        raise InvalidInputError("monitoring reference: unknown or missing thresholds")
    _floats(list(thresholds.values()), None, "thresholds")
    inputs, outputs = doc.get("inputs"), doc.get("outputs")
    if not isinstance(inputs, dict) or not isinstance(outputs, dict):
        raise InvalidInputError("monitoring reference: inputs and outputs must be objects")
    total = 0
    for name, block in inputs.items():
        if not isinstance(block, dict) or block.get("kind") not in ("columns", "channels", "ids"):
            raise InvalidInputError(f"monitoring reference: input {name!r} has no known kind")
        n = block.get("features")
        stride = block.get("stride")
        if not isinstance(n, int) or not isinstance(stride, int) or n < 1 or stride < 1:
            raise InvalidInputError(f"monitoring reference: input {name!r} features/stride")
        total += n
        for key in ("edges", "probs"):
            rows_of = block.get(key)
            if not isinstance(rows_of, list) or len(rows_of) != n:
                raise InvalidInputError(f"monitoring reference: input {name!r} {key}")
            for row in rows_of:
                _floats(row, BINS - 1 if key == "edges" else BINS, f"input {name!r} {key}")
        for key in ("mean", "std", "min", "max"):
            _floats(block.get(key), n, f"input {name!r} {key}")
    if total > MAX_FEATURES:
        raise InvalidInputError(f"monitoring reference: more than {MAX_FEATURES} features")
    for name, block in outputs.items():
        if not isinstance(block, dict) or block.get("kind") not in (
            "confidence",
            "norm",
            "classes",
        ):
            raise InvalidInputError(f"monitoring reference: output {name!r} has no known kind")
        if block["kind"] == "classes":
            classes = block.get("classes")
            if not isinstance(classes, list) or not 0 < len(classes) <= MAX_CLASSES:
                raise InvalidInputError(f"monitoring reference: output {name!r} classes")
            if not all(isinstance(c, int) and not isinstance(c, bool) for c in classes):
                raise InvalidInputError(f"monitoring reference: output {name!r} classes")
            _floats(block.get("probs"), len(classes), f"output {name!r} probs")
        else:
            _floats(block.get("edges"), BINS - 1, f"output {name!r} edges")
            _floats(block.get("probs"), BINS, f"output {name!r} probs")
            _floats([block.get("mean"), block.get("std")], 2, f"output {name!r} mean/std")
    return doc


def psi(counts: np.ndarray, ref_probs: np.ndarray, ref_rows: int) -> np.ndarray:
    """Population stability index of each row of ``counts`` against ``ref_probs`` (smoothed)."""
    counts = np.asarray(counts, dtype=np.float64)
    bins = counts.shape[-1]
    n = counts.sum(axis=-1, keepdims=True)
    p = (counts + _SMOOTH) / (n + _SMOOTH * bins)
    q = (np.asarray(ref_probs) * ref_rows + _SMOOTH) / (ref_rows + _SMOOTH * bins)
    return np.asarray(((p - q) * np.log(p / q)).sum(axis=-1))


class Monitor:
    """Running statistics of one model revision against its reference, in bounded memory.

    ``observe`` takes one inference's inputs and outputs. Small rows are copied into
    preallocated buffers of :data:`BUFFER_ROWS` rows and folded into the counts in one
    vectorised pass when a buffer fills (per-call numpy work costs more than a small
    model's inference); every ``window`` folded rows the window is scored
    (:meth:`scores`), kept as ``last``, and its counts start again.

    Given each inference's wall time (``seconds``), the monitor also samples: it folds
    about one call in ``stride`` (randomly spaced, so a periodic input cannot hide
    between samples) and keeps ``stride`` at the smallest value that holds its own
    measured cost under ``budget`` × the inference time. A window then spans about
    ``window × stride`` inferences; ``stride`` stays 1 while no time is given.

    ``total_rows``, ``total_confidence`` and ``total_classes`` run over the folded rows
    since the revision was installed (the canary comparison's figures); ``seen_calls`` counts every call,
    sampled or not. :meth:`to_dict` / :meth:`restore` carry the state across
    restarts; it holds counts and sums only, never a value of an input.
    """

    def __init__(
        self,
        reference: Mapping[str, Any],
        overrides: Mapping[str, float] | None = None,
        *,
        budget: float = OVERHEAD_BUDGET,
        seed: int | None = None,
    ) -> None:
        self.reference = check_reference(dict(reference))
        self.thresholds = {
            **DEFAULT_THRESHOLDS,
            **self.reference["thresholds"],
            **(overrides or {}),
        }
        self.window = max(1, int(self.thresholds["window"]))
        self.budget = float(budget)
        self._ref_rows = int(self.reference["rows"])
        self._inputs = {
            name: (
                _Shape(b["kind"], b["features"], b["stride"]),
                np.asarray(b["edges"], dtype=np.float64),
                np.asarray(b["min"], dtype=np.float64),
                np.asarray(b["max"], dtype=np.float64),
            )
            for name, b in self.reference["inputs"].items()
        }
        self._limits = {
            name: (lo - RANGE_TOLERANCE * (hi - lo), hi + RANGE_TOLERANCE * (hi - lo))
            for name, (_s, _e, lo, hi) in self._inputs.items()
        }
        self._outputs = {
            name: (b["kind"], np.asarray(b["edges"], dtype=np.float64)[None, :])
            for name, b in self.reference["outputs"].items()
            if b["kind"] != "classes"
        }
        self._classes = {
            name: np.asarray(b["classes"], dtype=np.int64)
            for name, b in self.reference["outputs"].items()
            if b["kind"] == "classes"
        }
        self._streams = [*self._inputs, *self._outputs, *self._classes]
        self.total_classes = {
            n: np.zeros(len(c) + 1, dtype=np.int64) for n, c in self._classes.items()
        }
        """Predicted-class counts since the revision was installed (never reset by a
        window): the canary compares this mix with the previous revision's reference."""
        self._buffers: dict[str, np.ndarray] = {}
        self._plan: list[tuple[str, bool, np.ndarray, int]] = []
        self._pending = 0
        self.total_rows = 0
        self.total_confidence = 0.0
        self._seen = 0
        self._gap = 1
        self.last: dict[str, Any] | None = None
        self.windows = 0
        self.stride = 1
        self._skip = 1
        self._random = random.Random(seed)  # noqa: S311 -- spaces samples; not a secret
        self._cost = 0.0
        self._sampled = 0
        self._seconds = 0.0
        self._timed = 0
        self._reset()

    def _reset(self) -> None:
        self.rows = 0
        self.anomalous_rows = 0
        self.in_counts = {
            n: np.zeros((s.features, BINS), dtype=np.int64) for n, (s, *_r) in self._inputs.items()
        }
        self.out_counts = {n: np.zeros(BINS, dtype=np.int64) for n in self._outputs}
        self.class_counts = {
            n: np.zeros(len(c) + 1, dtype=np.int64) for n, c in self._classes.items()
        }
        self.confidence_sum = 0.0

    # -- taking rows in --------------------------------------------------------------
    def observe(
        self,
        inputs: Mapping[str, Any],
        outputs: Mapping[str, Any],
        seconds: float | None = None,
    ) -> dict[str, Any] | None:
        """Take one inference in; return the window's scores when it completed one.

        ``seconds``, the inference's wall time, lets the monitor sample to stay within
        its budget; a call it skips costs a counter and returns None.
        """
        # The skipped call's path is a decrement and a test: it must cost far less than
        # the smallest inference monitored (about 15 µs for the digits MLP).
        self._skip -= 1
        if self._skip:
            return None
        start = time.perf_counter()
        try:
            return self._take(inputs, outputs)
        finally:
            self._cost += time.perf_counter() - start
            if seconds is not None:  # the taken calls' inference times sample them all
                self._seconds += seconds
                self._timed += 1
            self._sampled += 1
            if self._sampled >= ADAPT_EVERY:
                self._adapt()
            self._seen += self._gap
            self._gap = self._skip = (
                1 if self.stride == 1 else self._random.randint(1, 2 * self.stride - 1)
            )

    def skips(self) -> bool:
        """Count one inference; True when the sampler skips it (then do not call observe).

        A caller that asks first times and gathers outputs only for the sampled calls,
        which is what keeps the total under budget for a ~10 µs model; a False answer
        leaves the next :meth:`observe` to take this inference.
        """
        self._skip -= 1
        if self._skip:
            return True
        self._skip = 1
        return False

    @property
    def seen_calls(self) -> int:
        """Calls to :meth:`observe` since the revision was installed, sampled or not."""
        return self._seen + self._gap - self._skip

    def _adapt(self) -> None:
        """Set ``stride`` from the last period's measured cost per taken call."""
        if self._timed and self.budget > 0:
            inference = self._seconds / self._timed
            cost = self._cost / self._sampled
            wanted = math.ceil(cost / (self.budget * inference)) if inference > 0 else MAX_STRIDE
            self.stride = min(MAX_STRIDE, max(1, wanted))
        self._cost, self._sampled, self._seconds, self._timed = 0.0, 0, 0.0, 0

    def _take(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> dict[str, Any] | None:
        if not self._copy(inputs, outputs):
            flats: dict[str, np.ndarray] = {}
            batch = 0
            for name in self._inputs:
                if name in inputs:
                    flats[name] = _flat(inputs[name])
                    batch = max(batch, flats[name].shape[0])
            for name in (*self._outputs, *self._classes):
                if name in outputs:
                    flats[name] = _flat(outputs[name])
            if not self._buffer(flats, batch):
                self.flush()
                self._fold(flats, batch)
        if self.rows + self._pending >= self.window:
            self.flush()
        if self.rows >= self.window:
            self.last = self.scores()
            self.windows += 1
            self._reset()
            return self.last
        return None

    def _copy(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> bool:
        """The common case, kept lean: every stream an ndarray of its buffer's row width."""
        if not self._plan:
            return False
        start = self._pending
        end = -1
        for name, is_input, buffer, width in self._plan:
            value = (inputs if is_input else outputs).get(name)
            if type(value) is not np.ndarray or value.dtype.kind not in "biuf":
                return False
            shape = value.shape
            if end < 0:
                if not shape or shape[0] > BUFFER_ROWS:
                    return False
                if start + shape[0] > BUFFER_ROWS:
                    self.flush()
                    start = 0
                end = start + shape[0]
            if len(shape) == 2 and shape[1] == width and shape[0] == end - start:
                buffer[start:end] = value
            elif len(shape) == 1 and width == 1 and shape[0] == end - start:
                buffer[start:end, 0] = value
            else:
                return False
        self._pending = end
        return True

    def _buffer(self, flats: Mapping[str, np.ndarray], batch: int) -> bool:
        """Copy the batch into the row buffers; False when it must be folded directly."""
        if batch == 0 or batch > BUFFER_ROWS or len(flats) != len(self._streams):
            return False
        for name, flat in flats.items():
            buffer = self._buffers.get(name)
            if buffer is None:
                if flat.shape[1] * BUFFER_ROWS > BUFFER_VALUES or flat.dtype.kind not in "biuf":
                    return False
                self._buffers[name] = buffer = np.empty(
                    (BUFFER_ROWS, flat.shape[1]), dtype=np.float64
                )
            if flat.shape != (batch, buffer.shape[1]) or flat.dtype.kind not in "biuf":
                return False
        if self._pending + batch > BUFFER_ROWS:
            self.flush()
        end = self._pending + batch
        for name, flat in flats.items():
            self._buffers[name][self._pending : end] = flat
        self._pending = end
        self._plan = [
            (name, name in self._inputs, self._buffers[name], self._buffers[name].shape[1])
            for name in self._streams
        ]
        return True

    def flush(self) -> None:
        """Fold the buffered rows into the counts (done before scoring or saving)."""
        if self._pending:
            rows, self._pending = self._pending, 0
            self._fold({n: b[:rows] for n, b in self._buffers.items()}, rows)

    def _fold(self, flats: Mapping[str, np.ndarray], rows: int) -> None:
        """Count ``rows`` rows (name → (rows, values) array) into the window."""
        if rows == 0:
            return
        anomalous = np.zeros(rows, dtype=bool)
        for name, (shape, edges, _lo, _hi) in self._inputs.items():
            flat = flats.get(name)
            if flat is None:
                continue
            if flat.dtype.kind not in "biuf":  # strings, objects: all anomalous, not counted
                anomalous[: flat.shape[0]] = True
                continue
            values = _values(flat, shape)
            finite = np.isfinite(values)
            # Non-finite values count as anomalies and stay out of the histograms, so a
            # NaN never turns a later score into NaN nor moves a bin.
            counted = np.where(finite, values, edges[:, :1])
            counts = _histogram(counted, edges)
            if not finite.all():
                counts[:, 0] -= (~finite).sum(axis=1)
            self.in_counts[name] += counts
            low, high = self._limits[name]
            outside = ~finite | (values < low[:, None]) | (values > high[:, None])
            per_row = outside.reshape(shape.features, flat.shape[0], -1).any(axis=(0, 2))
            anomalous[: flat.shape[0]] |= per_row
        for name, (kind, edges) in self._outputs.items():
            flat = flats.get(name)
            if flat is None or flat.dtype.kind not in "biuf":
                continue
            values = _output_values(flat, kind)
            values = values[np.isfinite(values)]
            self.out_counts[name] += _histogram(values[None, :], edges)[0]
            if kind == "confidence":
                total = float(values.sum())
                self.confidence_sum += total
                self.total_confidence += total
        for name, classes in self._classes.items():
            flat = flats.get(name)
            if flat is None or flat.dtype.kind not in "biuf":
                continue
            raw = _output_values(flat, "classes")
            values = np.where(np.isfinite(raw), raw, -1).astype(np.int64)
            pos = np.searchsorted(classes, values)
            known = (pos < len(classes)) & (classes[np.minimum(pos, len(classes) - 1)] == values)
            index = np.where(known, pos, len(classes))
            counted = np.bincount(index, minlength=len(classes) + 1)
            self.class_counts[name] += counted
            self.total_classes[name] += counted
        self.rows += rows
        self.total_rows += rows
        self.anomalous_rows += int(anomalous.sum())

    # -- scores ------------------------------------------------------------------------
    def scores(self) -> dict[str, Any]:
        """Drift, anomaly and confidence figures of the current window, and the alerts."""
        self.flush()
        ref_rows = self._ref_rows
        t = self.thresholds
        per_input: dict[str, Any] = {}
        worst_feature = 0.0
        drift = 0.0
        for name, counts in self.in_counts.items():
            block = self.reference["inputs"][name]
            values = psi(counts, np.asarray(block["probs"]), ref_rows)
            mean = float(values.mean()) if values.size else 0.0
            top = int(values.argmax()) if values.size else 0
            per_input[name] = {
                "psi": round(mean, 4),
                "max_feature_psi": round(float(values.max(initial=0.0)), 4),
                "worst_feature": top,
            }
            worst_feature = max(worst_feature, float(values.max(initial=0.0)))
            drift = max(drift, mean)
        outputs: dict[str, Any] = {}
        for name, out_counts in self.out_counts.items():
            block = self.reference["outputs"][name]
            entry: dict[str, Any] = {
                "psi": round(float(psi(out_counts, np.asarray(block["probs"]), ref_rows)), 4)
            }
            if block["kind"] == "confidence" and self.rows:
                mean = self.confidence_sum / self.rows
                entry["mean_confidence"] = round(mean, 4)
                entry["confidence_shift"] = round(mean - float(block["mean"]), 4)
            outputs[name] = entry
        for name, class_counts in self.class_counts.items():
            block = self.reference["outputs"][name]
            ref = np.asarray([*block["probs"], max(0.0, 1.0 - sum(block["probs"]))])
            outputs[name] = {"psi": round(float(psi(class_counts, ref, ref_rows)), 4)}
        anomaly = self.anomalous_rows / self.rows if self.rows else 0.0
        alerts = []
        if drift > t["drift_psi"]:
            alerts.append({"kind": "drift", "value": round(drift, 4), "threshold": t["drift_psi"]})
        if worst_feature > t["feature_psi"]:
            alerts.append(
                {
                    "kind": "feature-drift",
                    "value": round(worst_feature, 4),
                    "threshold": t["feature_psi"],
                }
            )
        if anomaly > t["anomaly_rate"]:
            alerts.append(
                {"kind": "anomalies", "value": round(anomaly, 4), "threshold": t["anomaly_rate"]}
            )
        for name, entry in outputs.items():
            shift = entry.get("confidence_shift")
            if shift is not None and -shift > t["confidence_drop"]:
                alerts.append(
                    {
                        "kind": "confidence",
                        "output": name,
                        "value": shift,
                        "threshold": -t["confidence_drop"],
                    }
                )
            if entry["psi"] > t["output_psi"]:
                alerts.append(
                    {
                        "kind": "output-drift",
                        "output": name,
                        "value": entry["psi"],
                        "threshold": t["output_psi"],
                    }
                )
        return {
            "rows": self.rows,
            "drift_psi": round(drift, 4),
            "max_feature_psi": round(worst_feature, 4),
            "anomaly_rate": round(anomaly, 4),
            "inputs": per_input,
            "outputs": outputs,
            "alerts": alerts,
        }

    # -- persistence -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The state to flush to DATA: counts and sums only (buffered rows folded first)."""
        self.flush()
        return {
            "format_version": FORMAT_VERSION,
            "rows": self.rows,
            "anomalous_rows": self.anomalous_rows,
            "confidence_sum": self.confidence_sum,
            "total_rows": self.total_rows,
            "total_confidence": self.total_confidence,
            "seen_calls": self.seen_calls,
            "stride": self.stride,
            "windows": self.windows,
            "last": self.last,
            "inputs": {n: c.tolist() for n, c in self.in_counts.items()},
            "outputs": {n: c.tolist() for n, c in self.out_counts.items()},
            "classes": {n: c.tolist() for n, c in self.class_counts.items()},
            "total_classes": {n: c.tolist() for n, c in self.total_classes.items()},
        }

    def restore(self, state: Mapping[str, Any]) -> bool:
        """Take back a flushed state; False (and a fresh state) when it does not fit the reference."""
        try:
            if state.get("format_version") != FORMAT_VERSION:
                return False
            in_counts = {n: np.asarray(state["inputs"][n], dtype=np.int64) for n in self.in_counts}
            out_counts = {
                n: np.asarray(state["outputs"][n], dtype=np.int64) for n in self.out_counts
            }
            class_counts = {
                n: np.asarray(state["classes"][n], dtype=np.int64) for n in self.class_counts
            }
            # A state flushed before the counts since install were kept starts them at 0.
            kept = state.get("total_classes") or {}
            total_classes = {
                n: np.asarray(kept[n], dtype=np.int64) if n in kept else np.zeros_like(c)
                for n, c in self.total_classes.items()
            }
            for new, old in (
                (in_counts, self.in_counts),
                (out_counts, self.out_counts),
                (class_counts, self.class_counts),
                (total_classes, self.total_classes),
            ):
                for n, arr in new.items():
                    if arr.shape != old[n].shape or (arr < 0).any():
                        return False
            rows, anomalous = int(state["rows"]), int(state["anomalous_rows"])
            totals = (
                int(state["total_rows"]),
                float(state["total_confidence"]),
                int(state["windows"]),
            )
            seen = int(state.get("seen_calls", 0))
            stride = int(state.get("stride", 1))
            confidence = float(state["confidence_sum"])
            last = state.get("last")
        except (KeyError, TypeError, ValueError, OverflowError):
            return False
        if (
            not all(math.isfinite(v) for v in (confidence, totals[1]))
            or min(rows, anomalous, totals[0], totals[2], seen) < 0
        ):
            return False
        self._pending = 0
        self.in_counts, self.out_counts, self.class_counts = in_counts, out_counts, class_counts
        self.total_classes = total_classes
        self.rows, self.anomalous_rows, self.confidence_sum = rows, anomalous, confidence
        self.total_rows, self.total_confidence, self.windows = totals
        self.stride = min(MAX_STRIDE, max(1, stride))
        self._seen, self._gap, self._skip = seen, 1, 1
        self.last = last if isinstance(last, dict) else None
        return True


def _flat(value: Any) -> np.ndarray:
    """A (rows, values) view of one input or output (a scalar is one row of one value)."""
    array = np.asarray(value)
    if array.ndim == 0:
        return array.reshape(1, 1)
    return array.reshape(array.shape[0], -1)
