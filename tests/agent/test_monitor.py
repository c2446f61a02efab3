"""Monitoring on the device: a real bundle carrying a reference, real onnxruntime, the
application's monitored session, its state across restarts, alerts in status, check and
the report, the previous revision beside the new one."""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import device_agent
from device_agent import config, monitorstore, report
from device_agent.monitor import MonitoredSession
from device_agent.status import MONITOR_ALERT
from edgepack import bundle, fleetreport, monitoring
from edgepack.signing import ProducerKeySigner
from tests.agent._support import MODEL, REPO_ROOT, World, fast_limits, run_agent
from tests.agent.conftest import poll as _poll

FEATURES, CLASSES = 4, 3
MARKER = 1234.5678  # a distinctive input value: its bytes and text must never reach the disk


def _rows(n: int, shift: float = 0.0, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(0, 1, (n, FEATURES)) + shift).astype(np.float32)


def _model_dir(dest: Path, scale: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """A classifier X[N,4] -> probs[N,3] (softmax), label[N] (argmax); its health set and
    monitoring reference (window 200)."""
    dest.mkdir(parents=True, exist_ok=True)
    w = (np.arange(FEATURES * CLASSES, dtype=np.float32).reshape(FEATURES, CLASSES) % 5 - 2) * scale
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", FEATURES])
    probs = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", CLASSES])
    label = helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        helper.make_node("ArgMax", ["probs"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(nodes, "clf", [x], [probs, label], [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(dest / "model.onnx"))
    sess = ort.InferenceSession(str(dest / "model.onnx"), providers=["CPUExecutionProvider"])
    golden = _rows(1, seed=99)
    out = sess.run(None, {"X": golden})
    (dest / "health").mkdir(exist_ok=True)
    np.savez(dest / "health" / "golden.npz", case0_in0=golden, case0_out0=out[0], case0_out1=out[1])
    ref_in = _rows(2000, seed=1)
    ref_out = sess.run(None, {"X": ref_in})
    reference = monitoring.build_reference(
        {"X": ref_in}, {"probs": ref_out[0], "label": ref_out[1]}, {"window": 200}
    )
    health = {
        "file": "health/golden.npz",
        "cases": 1,
        "tolerances": {"atol": 1e-4, "rtol": 1e-3, "label_agreement": 1.0},
        "budgets": {"latency_ms": 2000.0, "memory_mb": 2048.0},
    }
    return health, reference


# Bundle format v2 carries the reference (pack(monitoring=)); with an older pack the test
# writes reference.json itself after the install, as the agent would have.
SIGNED_REFERENCE = "monitoring" in inspect.signature(bundle.pack).parameters
_REFERENCES: dict[str, dict[str, Any]] = {}


def _publish(world: World, version: str, scale: float) -> None:
    src = world.base / f"src-{version}"
    shutil.rmtree(src, ignore_errors=True)
    health, reference = _model_dir(src, scale)
    _REFERENCES[version] = reference
    extra: dict[str, Any] = {"monitoring": reference} if SIGNED_REFERENCE else {}
    result = bundle.pack(
        src,
        world.base / "bundles",
        name=MODEL,
        version=version,
        recipients=[world.fleet_key.public_key()],
        signer=ProducerKeySigner(world.producer_key),
        health=health,
        **extra,
    )
    world.targets[version] = world.repo.add_bundle(result.path, version)
    world.repo.promote(version, world.targets[version])


def poll(data: Path) -> Any:
    """One poll; the running revision's reference kept as the agent keeps it."""
    outcome = _poll(data)
    rev = _running(data)
    if not SIGNED_REFERENCE and monitorstore.load_reference(data, MODEL, rev) is None:
        monitorstore.save_reference(data, MODEL, rev, _REFERENCES[rev.rsplit("-", 1)[0]])
    return outcome


def _running(data: Path) -> str:
    link = (data / "models" / MODEL / "current").readlink()
    return str(link)


def _feed(session: Any, rows: np.ndarray, batch: int = 50) -> None:
    for i in range(0, len(rows), batch):
        session.run(["label"], {"X": rows[i : i + batch]})


def _status(data: Path) -> dict[str, Any]:
    out = run_agent("status", "--json", data=data)
    assert out.returncode == 0, out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


@pytest.fixture
def device(world: World, tmp_path: Path) -> Path:
    data = tmp_path / "dev"
    world.enroll(data, limits=fast_limits(monitor_flush_rows=100, monitor_flush_s=3600.0))
    _publish(world, "1.0.0", 1.0)
    assert poll(data).action == "installed"
    return data


def test_install_keeps_the_reference_outside_the_verified_revision(device: Path) -> None:
    rev = _running(device)
    folder = monitorstore.revision_dir(device, MODEL, rev)
    ref = json.loads((folder / monitorstore.REFERENCE_NAME).read_text())
    assert ref["inputs"]["X"]["features"] == FEATURES and ref["thresholds"]["window"] == 200
    assert not (device / "models" / MODEL / rev / monitorstore.REFERENCE_NAME).exists()
    from device_agent.slots import Slots

    assert Slots(device, MODEL).verify(rev) is None


def test_monitored_session_answers_as_a_plain_one(device: Path) -> None:
    session = device_agent.open_session(MODEL, device)
    plain = device_agent.open_session(MODEL, device, monitor=False)
    assert isinstance(session, MonitoredSession) and not isinstance(plain, MonitoredSession)
    x = _rows(10, seed=5)
    only_label = session.run(["label"], {"X": x})
    assert len(only_label) == 1 and only_label[0].dtype == np.int64
    np.testing.assert_array_equal(only_label[0], plain.run(["label"], {"X": x})[0])
    both = session.run(None, {"X": x})
    for mine, theirs in zip(both, plain.run(None, {"X": x}), strict=True):
        np.testing.assert_array_equal(mine, theirs)
    # Asked only for the label, the monitor still saw the probabilities it watches.
    assert session.monitor.to_dict()["confidence_sum"] > 0
    assert session.get_inputs()[0].name == "X"  # delegated
    session.close()


def test_counts_survive_a_restart_in_a_new_process(device: Path) -> None:
    code = (
        "import sys, numpy as np, device_agent\n"
        f"s = device_agent.open_session({MODEL!r}, {str(device)!r})\n"
        "print(s.monitor.total_rows)\n"
        "x = np.random.default_rng(int(sys.argv[1])).normal(0, 1, (30, 4)).astype('float32')\n"
        "for _ in range(5): s.run(['label'], {'X': x})\n"
    )  # no close(): the counts are flushed at interpreter exit
    seen = []
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code, seed],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            check=True,
        )
        seen.append(int(out.stdout.strip()))
    assert seen == [0, 150]
    summary = monitorstore.summary(device, MODEL, _running(device))
    assert summary is not None and summary["total_rows"] == 300 and summary["windows"] == 1


def test_shifted_inputs_raise_an_alert_in_status_and_check(device: Path) -> None:
    with device_agent.open_session(MODEL, device) as session:
        _feed(session, _rows(200, seed=3))
    doc = _status(device)["models"][MODEL]["monitoring"]
    assert doc["rows"] == 200 and doc["alerts"] == [], doc
    assert run_agent("check", data=device).returncode == 0
    with device_agent.open_session(MODEL, device) as session:
        _feed(session, _rows(200, shift=3.0, seed=4))
    doc = _status(device)["models"][MODEL]["monitoring"]
    kinds = {a["kind"] for a in doc["alerts"]}
    assert {"drift", "anomalies"} <= kinds, doc
    assert doc["drift_psi"] > 0.2 and doc["total_rows"] == 400
    out = run_agent("check", "--json", data=device)
    assert out.returncode == MONITOR_ALERT == 8, out.stdout + out.stderr
    problems = json.loads(out.stdout)["problems"]
    assert [p["code"] for p in problems] == [8] and "drift" in problems[0]["problem"]
    human = run_agent("status", data=device).stdout
    assert "ALERT drift" in human and "drift PSI" in human


def test_monitoring_off_in_config_gives_a_plain_session(device: Path) -> None:
    cfg = config.load(device)
    cfg.monitoring = False
    config.save(cfg)
    assert not isinstance(device_agent.open_session(MODEL, device), MonitoredSession)
    cfg.monitoring = True
    config.save(cfg)
    assert isinstance(device_agent.open_session(MODEL, device), MonitoredSession)


def test_config_overrides_the_bundles_thresholds(device: Path) -> None:
    text = (device / "config.toml").read_text()
    (device / "config.toml").write_text(
        text.replace("monitor_window = 0", "monitor_window = 50").replace(
            "monitor_drift_psi = 0.0", "monitor_drift_psi = 5.0"
        )
    )
    session = device_agent.open_session(MODEL, device)
    assert session.monitor.window == 50 and session.monitor.thresholds["drift_psi"] == 5.0
    assert session.monitor.thresholds["anomaly_rate"] == 0.05  # the bundle's
    (device / "config.toml").write_text(text.replace("monitoring = true", 'monitoring = "no"'))
    out = run_agent("status", data=device)
    assert out.returncode == 3 and "must be true or false" in out.stderr


def test_an_unwritable_monitor_folder_keeps_inference_and_monitoring_in_memory(
    device: Path,
) -> None:
    """The application runs as another user than the agent: it loads the model but may
    not write the monitor folder (as root, the child drops to nobody after loading)."""
    folder = monitorstore.revision_dir(device, MODEL, _running(device))
    code = (
        "import os, numpy as np, device_agent\n"
        f"s = device_agent.open_session({MODEL!r}, {str(device)!r})\n"
        "x = np.random.default_rng(6).normal(0, 1, (100, 4)).astype('float32')\n"
        "if os.geteuid() == 0:\n"
        "    os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "for _ in range(5): assert s.run(['label'], {'X': x})[0].shape == (100,)\n"
        "s.close()\n"
        "print(s.monitor.total_rows, s.persistent, s.monitor.windows)\n"
    )
    if os.geteuid() != 0:
        folder.chmod(0o550)
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT
        )
    finally:
        folder.chmod(0o770)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["500", "False", "2"]
    assert out.stderr.count("in memory") == 1, out.stderr
    assert not (folder / monitorstore.STATE_NAME).exists()


def test_a_broken_state_file_starts_fresh(device: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = monitorstore.revision_dir(device, MODEL, _running(device)) / monitorstore.STATE_NAME
    state.write_text('{"format": 1, "revision": "x"')
    with caplog.at_level(logging.WARNING, "device_agent.monitor"):
        session = device_agent.open_session(MODEL, device)
    assert session.monitor.total_rows == 0 and "starting fresh" in caplog.text
    _feed(session, _rows(100, seed=7))
    assert session.run(["label"], {"X": _rows(3)})[0].shape == (3,)
    session.close()
    assert json.loads(state.read_text())["state"]["total_rows"] == 103


def test_hostile_inputs_never_break_inference(device: Path) -> None:
    session = device_agent.open_session(MODEL, device)
    bad = np.full((4, FEATURES), np.nan, dtype=np.float32)
    bad[1] = np.inf
    assert session.run(["probs"], {"X": bad})[0].shape == (4, CLASSES)
    with pytest.raises(Exception, match=r"(?i)invalid|dimension|shape"):  # onnxruntime's own
        session.run(["probs"], {"X": np.zeros((2, 7), np.float32)})
    session.close()


def test_no_raw_input_reaches_the_disk(device: Path) -> None:
    session = device_agent.open_session(MODEL, device)
    x = _rows(300, seed=8)
    x[:, 2] = MARKER
    _feed(session, x)
    session.close()
    needles = [
        np.float32(MARKER).tobytes(),
        np.float64(np.float32(MARKER)).tobytes(),
        b"1234.5",
        b"1234.57",
    ]
    for path in (device / "monitor").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(n in data for n in needles), path


def test_the_report_carries_monitoring_and_stays_small(world: World, device: Path) -> None:
    cfg = config.load(device)
    queued = report.queue_now(cfg, profile="", architecture="x86_64")
    entry = fleetreport.parse_report(queued.body)["models"][MODEL]
    assert "monitoring" not in entry  # nothing scored yet: nothing said
    with device_agent.open_session(MODEL, device) as session:
        _feed(session, _rows(200, seed=9))
    poll(device)  # the daemon's status.json takes the figures in
    queued = report.queue_now(cfg, profile="", architecture="x86_64")
    assert len(queued.body) < 1024, len(queued.body)
    watch = fleetreport.parse_report(queued.body)["models"][MODEL]["monitoring"]
    assert watch["revision"] == _running(device) and watch["rows"] == 200
    assert watch["alerts"] == [] and 0 < watch["mean_confidence"] <= 1


def test_previous_revisions_figures_beside_the_new_one(world: World, device: Path) -> None:
    first = _running(device)
    with device_agent.open_session(MODEL, device) as session:
        _feed(session, _rows(200, seed=10))
    _publish(world, "2.0.0", 0.1)  # a flatter model: lower confidence on the same inputs
    assert poll(device).action == "installed"
    second = _running(device)
    assert second != first
    with device_agent.open_session(MODEL, device) as session:
        assert session.monitor.total_rows == 0  # never mixed with the first revision's
        _feed(session, _rows(200, seed=11))
    watch = _status(device)["models"][MODEL]["monitoring"]
    assert watch["revision"] == second and watch["previous"]["revision"] == first
    assert watch["mean_confidence"] < watch["previous"]["mean_confidence"] - 0.1, watch
    poll(device)
    queued = report.queue_now(config.load(device), profile="", architecture="x86_64")
    entry = fleetreport.parse_report(queued.body)["models"][MODEL]["monitoring"]
    assert entry["revision"] == second and entry["previous"]["revision"] == first
    assert entry["previous"]["mean_confidence"] == watch["previous"]["mean_confidence"]


def test_pruning_a_revision_removes_its_monitor_folder(world: World, device: Path) -> None:
    first = _running(device)
    _publish(world, "2.0.0", 1.5)
    poll(device)
    _publish(world, "3.0.0", 2.0)
    poll(device)
    assert not monitorstore.revision_dir(device, MODEL, first).exists()
    assert monitorstore.revision_dir(device, MODEL, _running(device)).is_dir()


def test_sampled_calls_answer_as_plain_ones_and_are_counted(device: Path) -> None:
    """Over many small inferences the sampler skips calls: those are plain runs."""
    session = device_agent.open_session(MODEL, device)
    plain = device_agent.open_session(MODEL, device, monitor=False)
    x = _rows(3000, seed=12)
    for i in range(3000):
        row = x[i : i + 1]
        mine = session.run(["label"], {"X": row})
        assert len(mine) == 1 and mine[0][0] == plain.run(["label"], {"X": row})[0][0]
    session.close()
    summary = monitorstore.summary(device, MODEL, _running(device))
    assert summary is not None and summary["seen_calls"] == 3000
    assert 0 < summary["total_rows"] <= 3000


def test_a_deleted_state_file_starts_fresh_and_says_so(
    device: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = monitorstore.revision_dir(device, MODEL, _running(device)) / monitorstore.STATE_NAME
    with device_agent.open_session(MODEL, device) as session:
        _feed(session, _rows(150, seed=13))
    assert json.loads(state.read_text())["state"]["total_rows"] == 150
    state.unlink()  # between two sessions: a clean-up, a full-disk repair, an operator
    with caplog.at_level(logging.INFO, "device_agent.monitor"):
        session = device_agent.open_session(MODEL, device)
    assert session.monitor.total_rows == 0 and session.monitor.windows == 0
    assert "no monitoring state" in caplog.text and "starting fresh" in caplog.text
    _feed(session, _rows(50, seed=14))
    session.close()
    assert json.loads(state.read_text())["state"]["total_rows"] == 50


def test_a_previous_revisions_state_never_counts_for_the_new_one(
    world: World, device: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Even the old revision's state.json copied into the new folder is not taken up."""
    first = _running(device)
    with device_agent.open_session(MODEL, device) as session:
        _feed(session, _rows(200, seed=15))
    old_state = monitorstore.revision_dir(device, MODEL, first) / monitorstore.STATE_NAME
    _publish(world, "2.0.0", 1.0)  # the same weights: identical reference shapes
    assert poll(device).action == "installed"
    second = _running(device)
    new_state = monitorstore.revision_dir(device, MODEL, second) / monitorstore.STATE_NAME
    shutil.copyfile(old_state, new_state)
    assert monitorstore.summary(device, MODEL, second) is None  # not its revision's figures
    with caplog.at_level(logging.WARNING, "device_agent.monitor"):
        session = device_agent.open_session(MODEL, device)
    assert session.monitor.total_rows == 0 and session.monitor.windows == 0
    assert "does not fit" in caplog.text
    _feed(session, _rows(100, seed=16))
    session.close()
    summary = monitorstore.summary(device, MODEL, second)
    assert summary is not None and summary["total_rows"] == 100 and summary["windows"] == 0
    before = monitorstore.summary(device, MODEL, first)
    assert before is not None and before["total_rows"] == 200  # the old one's untouched


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((3, FEATURES), np.int64),
        np.zeros((3, FEATURES), np.float64),
        np.array([["a"] * FEATURES] * 3),
    ],
    ids=["int64", "float64", "str"],
)
def test_a_wrong_dtype_raises_onnxruntimes_error_and_leaves_the_counts_whole(
    device: Path, bad: np.ndarray
) -> None:
    session = device_agent.open_session(MODEL, device)
    plain = device_agent.open_session(MODEL, device, monitor=False)
    with pytest.raises(Exception) as theirs:
        plain.run(["label"], {"X": bad})
    for _ in range(3):  # taken and (had the sampler grown a stride) skipped calls alike
        with pytest.raises(type(theirs.value)) as mine:
            session.run(["label"], {"X": bad})
        assert str(mine.value) == str(theirs.value)
    assert session.monitor.total_rows == 0 and session.monitor.anomalous_rows == 0
    x = _rows(7, seed=17)
    np.testing.assert_array_equal(
        session.run(["label"], {"X": x})[0], plain.run(["label"], {"X": x})[0]
    )
    state = session.monitor.to_dict()
    assert state["total_rows"] == 7 and state["anomalous_rows"] == 0
    assert np.isfinite(state["confidence_sum"]) and state["confidence_sum"] > 0
    scores = session.monitor.scores()
    assert scores["anomaly_rate"] == 0 and np.isfinite(scores["drift_psi"])
    session.close()
