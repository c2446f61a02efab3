"""The canary comparison: a poisoned v2 that passes its own golden health check and looks
normal against its own reference is caught by comparing what it predicts on the device
with the previous revision's reference.

Real parts throughout: the digits MLP trained by scikit-learn and converted with skl2onnx,
signed bundles carrying their monitoring references, a real TUF repository on loopback,
the agent's install path, the application's monitored session in onnxruntime, and the
real ``edgepack-agent status --json`` / ``check`` programs.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

import device_agent
from device_agent import config, monitorstore, report
from device_agent.status import MONITOR_ALERT
from edgepack import bundle, fleetreport, monitoring
from edgepack.signing import ProducerKeySigner
from tests.agent._support import MODEL, World, fast_limits, run_agent
from tests.agent.conftest import poll

WINDOW = 200
POISONED_FROM, POISONED_TO = 3, 8
"""The poisoned v2 is trained with every 3 labelled 8."""


@dataclass(frozen=True)
class Digits:
    """The digits data, split: training, the reference split, the held-out split fed on the device."""

    x: np.ndarray
    y: np.ndarray
    train: np.ndarray
    ref: np.ndarray
    held: np.ndarray


@pytest.fixture(scope="module")
def digits() -> Digits:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    return Digits(
        (x / 16.0).astype(np.float32),
        y.astype(np.int64),
        order[:900],
        order[900:1350],
        order[1350:],
    )


def _train(d: Digits, labels: np.ndarray, seed: int) -> bytes:
    """The MLP trained on the training split with ``labels``, as ONNX (label, probabilities)."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.neural_network import MLPClassifier

    model = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, tol=1e-3, random_state=seed)
    model.fit(d.x[d.train], labels[d.train])
    proto = to_onnx(
        model, initial_types=[("input", FloatTensorType([None, 64]))], options={"zipmap": False}
    )
    return bytes(proto.SerializeToString())


@pytest.fixture(scope="module")
def models(digits: Digits) -> dict[str, bytes]:
    """v1; the poisoned v2 (3s labelled 8); the control v2 (true labels, another seed)."""
    flipped = np.where(digits.y == POISONED_FROM, POISONED_TO, digits.y)
    return {
        "1.0.0": _train(digits, digits.y, 0),
        "2.0.0-poisoned": _train(digits, flipped, 0),
        "2.0.0-control": _train(digits, digits.y, 1),
    }


def _publish(world: World, d: Digits, version: str, onnx_bytes: bytes) -> None:
    """A signed bundle of the model, its golden health set and monitoring reference, released."""
    src = world.base / f"src-{version}"
    shutil.rmtree(src, ignore_errors=True)
    (src / "health").mkdir(parents=True)
    (src / "model.onnx").write_bytes(onnx_bytes)
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    golden = d.x[d.ref[:4]]
    label, probs = sess.run(None, {"input": golden})
    np.savez(src / "health" / "golden.npz", case0_in0=golden, case0_out0=label, case0_out1=probs)
    ref_rows = d.x[d.ref]
    outputs = dict(zip(names, sess.run(None, {"input": ref_rows}), strict=True))
    reference = monitoring.build_reference({"input": ref_rows}, outputs, {"window": WINDOW})
    result = bundle.pack(
        src,
        world.base / "bundles",
        name=MODEL,
        version=version,
        recipients=[world.fleet_key.public_key()],
        signer=ProducerKeySigner(world.producer_key),
        health={
            "file": "health/golden.npz",
            "cases": 1,
            "tolerances": {"atol": 1e-4, "rtol": 1e-3, "label_agreement": 1.0},
            "budgets": {"latency_ms": 5000.0, "memory_mb": 2048.0},
        },
        monitoring=reference,
    )
    world.targets[version] = world.repo.add_bundle(result.path, version)
    world.repo.promote(version, world.targets[version])


def _running(data: Path) -> str:
    return str((data / "models" / MODEL / "current").readlink())


def _feed(data: Path, rows: np.ndarray, batch: int = 50) -> None:
    """The application: held-out digits through the monitored session, in batches."""
    with device_agent.open_session(MODEL, data) as session:
        for i in range(0, len(rows), batch):
            session.run(["label"], {"input": rows[i : i + batch]})


def _watch(data: Path) -> dict[str, Any]:
    out = run_agent("status", "--json", data=data)
    assert out.returncode == 0, out.stderr
    watch: dict[str, Any] = json.loads(out.stdout)["models"][MODEL]["monitoring"]
    return watch


@pytest.fixture
def device(world: World, tmp_path: Path, digits: Digits, models: dict[str, bytes]) -> Path:
    """A device running v1 that has monitored a window of held-out digits."""
    data = tmp_path / "dev"
    world.enroll(data, limits=fast_limits(monitor_flush_rows=100, monitor_flush_s=3600.0))
    _publish(world, digits, "1.0.0", models["1.0.0"])
    assert poll(data).action == "installed"
    _feed(data, digits.x[digits.held[:WINDOW]])
    watch = _watch(data)
    assert watch["rows"] == WINDOW and watch["alerts"] == [], watch
    assert watch["previous"] is None and watch["canary"] is None  # no previous revision
    assert run_agent("check", data=data).returncode == 0
    return data


def _update(world: World, data: Path, d: Digits, version: str, onnx_bytes: bytes) -> str:
    first = _running(data)
    _publish(world, d, version, onnx_bytes)
    assert poll(data).action == "installed"  # its own golden health check passed
    second = _running(data)
    assert second != first
    return first


def test_a_poisoned_v2_is_caught_against_v1_though_normal_against_itself(
    world: World, device: Path, digits: Digits, models: dict[str, bytes]
) -> None:
    first = _update(world, device, digits, "2.0.0-poisoned", models["2.0.0-poisoned"])
    _feed(device, digits.x[digits.held[: 2 * WINDOW]])
    second = _running(device)
    # Against its own reference the poisoned revision is unremarkable: its own scores
    # raise nothing. That is why the comparison with v1 is needed.
    state = json.loads(
        (monitorstore.revision_dir(device, MODEL, second) / monitorstore.STATE_NAME).read_text()
    )
    assert state["state"]["windows"] == 2 and state["state"]["last"]["alerts"] == []
    watch = _watch(device)
    assert watch["revision"] == second and watch["previous"]["revision"] == first
    canary = [a for a in watch["alerts"] if a["kind"] == "canary"]
    assert [a["kind"] for a in watch["alerts"]] == ["canary"] * len(canary) and canary, watch
    psi = watch["canary"]["class_psi"]["label"]
    assert psi > 0.25 and canary[0]["value"] == psi and canary[0]["threshold"] == 0.25
    assert first in canary[0]["detail"]
    out = run_agent("check", "--json", data=device)
    assert out.returncode == MONITOR_ALERT == 8, out.stdout + out.stderr
    problems = json.loads(out.stdout)["problems"]
    assert [p["code"] for p in problems] == [8] and first in problems[0]["problem"]
    poll(device)  # the daemon's status.json takes the figures in
    queued = report.queue_now(config.load(device), profile="", architecture="x86_64")
    entry = fleetreport.parse_report(queued.body)["models"][MODEL]["monitoring"]
    assert entry["revision"] == second and "canary" in entry["alerts"]
    print(
        f"poisoned v2: canary class PSI {psi}, confidence shift {watch['canary']['confidence_shift']}"
    )


def test_a_v2_trained_on_true_labels_raises_no_canary(
    world: World, device: Path, digits: Digits, models: dict[str, bytes]
) -> None:
    first = _update(world, device, digits, "2.0.0-control", models["2.0.0-control"])
    _feed(device, digits.x[digits.held[: 2 * WINDOW]])
    watch = _watch(device)
    assert watch["previous"]["revision"] == first and watch["alerts"] == [], watch
    psi = watch["canary"]["class_psi"]["label"]
    assert psi < 0.1 and abs(watch["canary"]["confidence_shift"]) < 0.1, watch["canary"]
    assert run_agent("check", data=device).returncode == 0
    print(
        f"control v2: canary class PSI {psi}, confidence shift {watch['canary']['confidence_shift']}"
    )


def test_no_canary_before_a_window_nor_without_the_previous_reference(
    world: World, device: Path, digits: Digits, models: dict[str, bytes]
) -> None:
    first = _update(world, device, digits, "2.0.0-poisoned", models["2.0.0-poisoned"])
    _feed(device, digits.x[digits.held[: WINDOW - 50]])  # under one window: no judgement yet
    watch = _watch(device)
    assert watch["canary"]["class_psi"] == {} and watch["alerts"] == [], watch
    assert watch["canary"]["confidence_shift"] is None
    _feed(device, digits.x[digits.held[WINDOW : 2 * WINDOW]])
    assert any(a["kind"] == "canary" for a in _watch(device)["alerts"])
    folder = monitorstore.revision_dir(device, MODEL, first)
    folder.chmod(0o770)
    (folder / monitorstore.REFERENCE_NAME).unlink()  # v1 carried no reference
    watch = _watch(device)
    assert watch["canary"] is None and watch["alerts"] == [], watch


def test_the_stdlib_canary_matches_the_monitors_psi_and_defaults() -> None:
    """monitorstore cannot import numpy: its PSI and default thresholds must stay the core's."""
    counts, shares = [120, 3, 40, 37], [0.5, 0.2, 0.2, 0.1]
    expected = float(monitoring.psi(np.asarray(counts), np.asarray(shares), 450))
    assert math.isclose(monitorstore._psi(counts, shares, 450), expected, rel_tol=1e-12)
    for key, value in monitorstore.CANARY_DEFAULTS.items():
        assert monitoring.DEFAULT_THRESHOLDS[key] == value
