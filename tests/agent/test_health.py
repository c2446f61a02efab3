"""The golden health check, run with onnxruntime on a revision folder."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent import atrest, health
from device_agent.errors import CorruptRevisionError, HealthCheckError, UnsafeModelError
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


# -- the check on a payload in memory, and on an encrypted revision in a child -------------


def _encrypted_revision(base: Path, *, bad_golden: bool = False) -> tuple[Path, bytes, Any]:
    """A real bundle kept as an encrypted revision folder; its content key; its info."""
    from edgepack import bundle, keys
    from edgepack.bundle.metadata import hpke_info
    from edgepack.crypto import unwrap_key
    from edgepack.signing import ProducerKeySigner

    recipient = keys.generate_recipient_key()
    hp = make_model_dir(base / "src", 2.0, bad_golden=bad_golden)
    packed = bundle.pack(
        base / "src",
        base / "out",
        name="digits",
        version="1.0.0",
        recipients=[recipient.public_key()],
        signer=ProducerKeySigner(keys.generate_signing_key()),
        health=hp,
    )
    info = packed.info
    key = unwrap_key(
        list(info.encryption.recipients),
        recipient,
        hpke_info(info.name, info.version, info.profile, info.encryption),
    )
    revision = base / "rev"
    revision.mkdir()
    packed.path.rename(revision / atrest.BUNDLE_FILE)
    return revision, key, info


def _model_rel(info: Any) -> str:
    return str(info.metadata["model"]["path"])


def test_check_files_runs_the_golden_set_from_memory(tmp_path: Path) -> None:
    revision, key, info = _encrypted_revision(tmp_path)
    decrypted = atrest.decrypt_bundle(revision / atrest.BUNDLE_FILE, key, check_digests=True)
    health_set = info.metadata["health"]
    report = health.check_files(decrypted.files, _model_rel(info), health_set, latency_runs=2)
    assert report.passed and report.cases == 1 and report.latency_ms > 0
    golden = decrypted.files[health_set["file"]]
    expected = np.load(io.BytesIO(bytes(golden)))["case0_out0"]
    broken = io.BytesIO()
    np.savez(
        broken, case0_in0=np.arange(4, dtype=np.float32).reshape(1, 4), case0_out0=expected + 1
    )
    files = dict(decrypted.files)
    files[health_set["file"]] = memoryview(broken.getvalue())
    with pytest.raises(HealthCheckError, match="differ from the golden"):
        health.check_files(files, _model_rel(info), health_set)
    del files[health_set["file"]]
    with pytest.raises(UnsafeModelError, match="not in the revision's payload"):
        health.check_files(files, _model_rel(info), health_set)


def test_isolated_check_on_an_encrypted_revision_passes(tmp_path: Path) -> None:
    revision, key, info = _encrypted_revision(tmp_path)
    assert sorted(p.name for p in revision.iterdir()) == [atrest.BUNDLE_FILE]
    report = health.check_revision_isolated(
        revision, _model_rel(info), info.metadata["health"], latency_runs=1, content_key=key
    )
    assert report.passed and report.cases == 1
    assert sorted(p.name for p in revision.iterdir()) == [atrest.BUNDLE_FILE]  # nothing written


def test_isolated_check_on_an_encrypted_revision_fails_on_a_wrong_golden(tmp_path: Path) -> None:
    revision, key, info = _encrypted_revision(tmp_path, bad_golden=True)
    with pytest.raises(HealthCheckError, match="differ from the golden"):
        health.check_revision_isolated(
            revision, _model_rel(info), info.metadata["health"], content_key=key
        )


@pytest.mark.parametrize("damage", ["flipped-byte", "wrong-key"])
def test_a_damaged_encrypted_revision_is_corrupt_not_unhealthy(tmp_path: Path, damage: str) -> None:
    """A flipped ciphertext byte (or a key that does not open it) fails its segment's tag
    in the child and reaches the parent as CorruptRevisionError, so the agent repairs the
    revision instead of blaming the release."""
    revision, key, info = _encrypted_revision(tmp_path)
    if damage == "flipped-byte":
        path = revision / atrest.BUNDLE_FILE
        raw = bytearray(path.read_bytes())
        raw[info.payload_offset + 10] ^= 0x01
        path.write_bytes(bytes(raw))
    else:
        key = bytes(b ^ 0xFF for b in key)
    with pytest.raises(CorruptRevisionError, match="fails authentication") as caught:
        health.check_revision_isolated(
            revision, _model_rel(info), info.metadata["health"], content_key=key
        )
    assert not isinstance(caught.value, HealthCheckError)
    assert caught.value.hint and "falls back" in caught.value.hint
