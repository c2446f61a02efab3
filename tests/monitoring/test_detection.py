"""Detection power and false-alarm rate of the monitor on real onnxruntime inference.

The digits MLP (scikit-learn, converted with skl2onnx, run by onnxruntime) gets its
reference from a reference split; shifted inputs must raise an alert within the
first window (N = 500 inferences, every call folded: no sampling), unshifted
held-out data none over 10,000 inferences. The encoder is an onnx.helper graph with
an integer token-id input (embedding lookup, mean over the sequence). Each detection
test has a control: with every threshold at +inf the same data raises nothing, so
the assertion rests on the thresholds, not on an accident of the harness.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepack.monitoring import DEFAULT_THRESHOLDS, Monitor, build_reference

WINDOW = int(DEFAULT_THRESHOLDS["window"])
N = WINDOW
"""Detection within the first window: 500 inferences (one row each, all folded)."""
OFF = {k: math.inf for k in DEFAULT_THRESHOLDS if k != "window"}


class Digits:
    """The digits MLP in onnxruntime, its reference and a held-out split never used for it."""

    def __init__(self) -> None:
        from skl2onnx import to_onnx
        from skl2onnx.common.data_types import FloatTensorType
        from sklearn.datasets import load_digits
        from sklearn.neural_network import MLPClassifier

        x, y = load_digits(return_X_y=True)
        x = (x / 16.0).astype(np.float32)
        order = np.random.default_rng(0).permutation(len(x))
        train, ref, self.held = order[:900], order[900:1350], order[1350:]
        self.x = x
        model = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, tol=1e-3, random_state=0)
        model.fit(x[train], y[train])
        proto = to_onnx(
            model, initial_types=[("input", FloatTensorType([None, 64]))], options={"zipmap": False}
        )
        self.session = ort.InferenceSession(
            proto.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        self.names = [o.name for o in self.session.get_outputs()]
        self.reference = build_reference({"input": x[ref]}, self.outputs(x[ref]))

    def outputs(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.session.run(None, {"input": rows}), strict=True))

    def bootstrap(self, count: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return np.asarray(self.x[self.held[rng.integers(0, len(self.held), count)]])


@pytest.fixture(scope="module")
def digits() -> Digits:
    return Digits()


def windows(
    monitor: Monitor, rows: np.ndarray, outputs: dict[str, np.ndarray], feed: str
) -> Iterator[dict[str, Any]]:
    """Observe one inference (one row) at a time; yield each scored window."""
    for i in range(len(rows)):
        scored = monitor.observe(
            {feed: rows[i : i + 1]}, {k: v[i : i + 1] for k, v in outputs.items()}
        )
        if scored is not None:
            yield scored


def first_alerts(
    reference: dict[str, Any],
    rows: np.ndarray,
    outputs: dict[str, np.ndarray],
    feed: str,
    overrides: dict[str, float] | None = None,
) -> list[str]:
    scored = next(windows(Monitor(reference, overrides), rows[:N], outputs, feed))
    return sorted({a["kind"] for a in scored["alerts"]})


SHIFTS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "brightness x0.6": lambda x, rng: x * 0.6,
    "gaussian noise 0.15": lambda x, rng: np.clip(x + rng.normal(0, 0.15, x.shape), 0, 1),
    "dead pixels (rows 2-4 at 0)": lambda x, rng: np.where(
        (np.arange(64) // 8 >= 2) & (np.arange(64) // 8 <= 4), 0.0, x
    ),
}


@pytest.mark.parametrize("shift", sorted(SHIFTS))
def test_digits_shift_detected_within_n(digits: Digits, shift: str) -> None:
    rng = np.random.default_rng(7)
    rows = SHIFTS[shift](digits.bootstrap(N, seed=3), rng).astype(np.float32)
    outputs = digits.outputs(rows)
    alerts = first_alerts(digits.reference, rows, outputs, "input")
    assert alerts, f"{shift}: no alert within {N} inferences"
    assert {"drift", "feature-drift"} & set(alerts)
    assert first_alerts(digits.reference, rows, outputs, "input", OFF) == []


def test_digits_unshifted_no_alert_over_10000(digits: Digits) -> None:
    rows = digits.bootstrap(10_000, seed=11)
    scored = list(windows(Monitor(digits.reference), rows, digits.outputs(rows), "input"))
    assert len(scored) == 10_000 // WINDOW
    assert [s["alerts"] for s in scored if s["alerts"]] == []


def test_digits_false_alarm_rate_per_window(digits: Digits) -> None:
    """200 windows (100,000 inferences) of unshifted data: measured 0 alerting windows."""
    rows = digits.bootstrap(200 * WINDOW, seed=12)
    outputs = digits.outputs(rows)
    monitor = Monitor(digits.reference)
    alarms = 0
    for start in range(0, len(rows), 100):  # batches of 100 rows: the same counts, faster
        scored = monitor.observe(
            {"input": rows[start : start + 100]},
            {k: v[start : start + 100] for k, v in outputs.items()},
        )
        alarms += bool(scored and scored["alerts"])
    assert monitor.windows == 200
    assert alarms / monitor.windows <= 0.01


VOCAB, WIDTH, LENGTH = 1000, 16, 16


def zipf_ids(rng: np.random.Generator, rows: int, exponent: float, offset: int = 0) -> np.ndarray:
    return ((rng.zipf(exponent, (rows, LENGTH)) - 1 + offset) % VOCAB).astype(np.int64)


@pytest.fixture(scope="module")
def encoder() -> tuple[Any, dict[str, Any]]:
    table = np.random.default_rng(0).normal(0, 1, (VOCAB, WIDTH)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["embedded"]),
            helper.make_node("ReduceMean", ["embedded", "axes"], ["pooled"], keepdims=0),
        ],
        "encoder",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", WIDTH])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([1]), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = zipf_ids(np.random.default_rng(1), 2000, 1.5)
    reference = build_reference({"ids": ids}, {"pooled": session.run(None, {"ids": ids})[0]})
    return session, reference


@pytest.mark.parametrize(
    ("label", "exponent", "offset"), [("zipf 1.5 -> 1.25", 1.25, 0), ("ids moved by 300", 1.5, 300)]
)
def test_encoder_token_shift_detected_within_n(
    encoder: tuple[Any, dict[str, Any]], label: str, exponent: float, offset: int
) -> None:
    session, reference = encoder
    ids = zipf_ids(np.random.default_rng(5), N, exponent, offset)
    outputs = {"pooled": session.run(None, {"ids": ids})[0]}
    assert first_alerts(reference, ids, outputs, "ids"), f"{label}: no alert within {N}"
    assert first_alerts(reference, ids, outputs, "ids", OFF) == []


def test_encoder_unshifted_no_alert_over_10000(encoder: tuple[Any, dict[str, Any]]) -> None:
    session, reference = encoder
    ids = zipf_ids(np.random.default_rng(9), 10_000, 1.5)
    outputs = {"pooled": session.run(None, {"ids": ids})[0]}
    scored = list(windows(Monitor(reference), ids, outputs, "ids"))
    assert len(scored) == 10_000 // WINDOW
    assert [s["alerts"] for s in scored if s["alerts"]] == []


def test_sampler_takes_fewer_calls_when_inference_is_cheap(digits: Digits) -> None:
    """Told each inference took 1 µs, the monitor samples; every call is still counted."""
    rows = digits.bootstrap(20_000, seed=13)
    outputs = digits.outputs(rows)
    monitor = Monitor(digits.reference, seed=0)
    for i in range(len(rows)):
        if not monitor.skips():
            monitor.observe(
                {"input": rows[i : i + 1]}, {k: v[i : i + 1] for k, v in outputs.items()}, 1e-6
            )
    assert monitor.stride > 1
    assert monitor.seen_calls == 20_000
    assert monitor.total_rows < 20_000 // 2
    unsampled = Monitor(digits.reference)  # no time given: every call is folded
    for i in range(1000):
        unsampled.observe({"input": rows[i : i + 1]}, {k: v[i : i + 1] for k, v in outputs.items()})
    assert unsampled.stride == 1 and unsampled.total_rows == 1000


def test_nan_and_inf_are_anomalies_and_never_poison_the_scores(digits: Digits) -> None:
    rows = digits.bootstrap(WINDOW, seed=14)
    outputs = digits.outputs(rows)
    bad = rows.copy()
    bad[:50, 5] = np.nan
    bad[50:100, 9] = np.inf
    monitor = Monitor(digits.reference)
    scored = monitor.observe({"input": bad}, outputs)
    assert scored is not None
    assert scored["anomaly_rate"] >= 0.2
    assert all(math.isfinite(v) for v in (scored["drift_psi"], scored["max_feature_psi"]))
    clean = monitor.observe({"input": rows}, outputs)
    assert clean is not None and clean["alerts"] == []
