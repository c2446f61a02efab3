"""The golden health check, run with onnxruntime on a revision folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent import health
from device_agent.errors import HealthCheckError
from tests.agent._support import make_model_dir


def test_passes_on_matching_outputs(tmp_path: Path) -> None:
    meta = make_model_dir(tmp_path, 2.0)
    report = health.check_revision(tmp_path, "model.onnx", meta, latency_runs=3)
    assert report.passed and report.cases == 1 and report.latency_ms > 0


def test_fails_on_wrong_outputs(tmp_path: Path) -> None:
    meta = make_model_dir(tmp_path, 2.0, bad_golden=True)
    with pytest.raises(HealthCheckError, match="differ from the golden"):
        health.check_revision(tmp_path, "model.onnx", meta)


def test_fails_over_latency_budget(tmp_path: Path) -> None:
    meta = make_model_dir(tmp_path, 2.0)
    with pytest.raises(HealthCheckError, match="latency"):
        health.check_revision(tmp_path, "model.onnx", meta, budgets={"latency_ms": 0.0})


def test_fails_over_memory_budget(tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    table = np.random.default_rng(0).random((32 * 1024, 256), dtype=np.float32)  # 32 MB, used
    graph = helper.make_graph(
        [helper.make_node("Gather", ["T", "I"], ["Y"])],
        "g",
        [helper.make_tensor_value_info("I", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 256])],
        [numpy_helper.from_array(table, "T")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "model.onnx"))
    inp = np.array([0, 5], np.int64)
    out = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, {"I": inp})[0]
    (tmp_path / "health").mkdir()
    np.savez(tmp_path / "health" / "golden.npz", case0_in0=inp, case0_out0=out)
    meta = {"file": "health/golden.npz", "cases": 1, "tolerances": {"atol": 0.0}}
    with pytest.raises(HealthCheckError, match="memory"):
        health.check_revision(tmp_path, "model.onnx", meta, budgets={"memory_mb": 1.0})


def test_integer_outputs_use_label_agreement(tmp_path: Path) -> None:
    expected = np.array([1, 2, 3, 4])
    tol: dict[str, Any] = {"label_agreement": 0.75}
    assert health._compare("o", np.array([1, 2, 3, 0]), expected, tol) is None
    assert health._compare("o", np.array([1, 2, 0, 0]), expected, tol) is not None


def test_missing_case_arrays_fail(tmp_path: Path) -> None:
    meta = make_model_dir(tmp_path, 2.0)
    meta["cases"] = 2
    with pytest.raises(HealthCheckError, match="lacks case1_in0"):
        health.check_revision(tmp_path, "model.onnx", meta)
