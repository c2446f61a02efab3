"""Loading safety: external-data locations that leave the revision folder are refused."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from device_agent import safeload
from device_agent.errors import UnsafeModelError

W = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)


def _model_with_external(location: str, *, constant_node: bool = False) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])
    w = numpy_helper.from_array(W, "W")
    w.ClearField("raw_data")
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(W.nbytes))):
        entry = w.external_data.add()
        entry.key, entry.value = k, v
    if constant_node:
        const = helper.make_node("Constant", [], ["W"], value=w)
        nodes = [const, helper.make_node("Mul", ["X", "W"], ["Y"])]
        graph = helper.make_graph(nodes, "g", [x], [y])
    else:
        graph = helper.make_graph([helper.make_node("Mul", ["X", "W"], ["Y"])], "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _write(rev: Path, model: onnx.ModelProto) -> None:
    rev.mkdir(parents=True, exist_ok=True)
    (rev / "model.onnx").write_bytes(model.SerializeToString())


def test_external_data_inside_the_revision_loads(tmp_path: Path) -> None:
    rev = tmp_path / "rev"
    _write(rev, _model_with_external("weights/w.bin"))
    (rev / "weights").mkdir()
    (rev / "weights" / "w.bin").write_bytes(W.tobytes())
    assert safeload.external_data_locations(rev / "model.onnx") == ["weights/w.bin"]
    sess = safeload.open_session(rev, "model.onnx")
    assert np.allclose(sess.run(None, {"X": np.ones((1, 4), np.float32)})[0], W)


def test_locations_in_constant_nodes_are_found(tmp_path: Path) -> None:
    rev = tmp_path / "rev"
    _write(rev, _model_with_external("/etc/hostname", constant_node=True))
    assert safeload.external_data_locations(rev / "model.onnx") == ["/etc/hostname"]
    with pytest.raises(UnsafeModelError, match="absolute"):
        safeload.check_model(rev, "model.onnx")


@pytest.mark.parametrize("location", ["/etc/passwd", "\\\\server\\share\\w.bin", "C:\\w.bin"])
def test_absolute_location_refused(tmp_path: Path, location: str) -> None:
    rev = tmp_path / "rev"
    _write(rev, _model_with_external(location))
    with pytest.raises(UnsafeModelError, match="absolute"):
        safeload.open_session(rev, "model.onnx")


@pytest.mark.parametrize("location", ["../outside.bin", "sub/../../outside.bin", "..\\outside.bin"])
def test_dotdot_location_refused(tmp_path: Path, location: str) -> None:
    rev = tmp_path / "rev"
    _write(rev, _model_with_external(location))
    (tmp_path / "outside.bin").write_bytes(W.tobytes())
    with pytest.raises(UnsafeModelError, match=r"\.\."):
        safeload.open_session(rev, "model.onnx")


def test_symlink_refused(tmp_path: Path) -> None:
    rev = tmp_path / "rev"
    _write(rev, _model_with_external("w.bin"))
    secret = tmp_path / "secret.bin"
    secret.write_bytes(W.tobytes())
    (rev / "w.bin").symlink_to(secret)
    with pytest.raises(UnsafeModelError, match="symbolic link"):
        safeload.open_session(rev, "model.onnx")


def test_symlinked_folder_refused(tmp_path: Path) -> None:
    rev = tmp_path / "rev"
    _write(rev, _model_with_external("sub/w.bin"))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "w.bin").write_bytes(W.tobytes())
    (rev / "sub").symlink_to(outside)
    with pytest.raises(UnsafeModelError, match="link or non-folder"):
        safeload.open_session(rev, "model.onnx")


def test_hard_link_to_outside_file_refused(tmp_path: Path) -> None:
    rev = tmp_path / "rev"
    _write(rev, _model_with_external("w.bin"))
    secret = tmp_path / "secret.bin"
    secret.write_bytes(W.tobytes())
    os.link(secret, rev / "w.bin")
    # Unchecked, onnxruntime reads the outside file through the hard link...
    leaked = ort.InferenceSession(str(rev / "model.onnx"), providers=["CPUExecutionProvider"])
    assert np.allclose(leaked.run(None, {"X": np.ones((1, 4), np.float32)})[0], W)
    # ...so the agent refuses it.
    with pytest.raises(UnsafeModelError, match="hard link"):
        safeload.open_session(rev, "model.onnx")


def test_special_file_refused(tmp_path: Path) -> None:
    rev = tmp_path / "rev"
    _write(rev, _model_with_external("w.bin"))
    os.mkfifo(rev / "w.bin")
    with pytest.raises(UnsafeModelError, match="not a regular file"):
        safeload.open_session(rev, "model.onnx")


def test_model_file_itself_must_be_plain(tmp_path: Path) -> None:
    rev = tmp_path / "rev"
    rev.mkdir()
    real = tmp_path / "real.onnx"
    real.write_bytes(_model_with_external("w.bin").SerializeToString())
    (rev / "model.onnx").symlink_to(real)
    with pytest.raises(UnsafeModelError, match="symbolic link"):
        safeload.check_model(rev, "model.onnx")


def test_not_onnx_is_refused(tmp_path: Path) -> None:
    rev = tmp_path / "rev"
    rev.mkdir()
    (rev / "model.onnx").write_bytes(b"\x0a\xff\xff\xff\xff\x0f not protobuf")
    with pytest.raises(UnsafeModelError):
        safeload.check_model(rev, "model.onnx")


def test_locations_in_function_attribute_defaults_are_found(tmp_path: Path) -> None:
    """A local function's default attribute value (FunctionProto.attribute_proto) is a
    tensor onnxruntime reads, external data included."""
    rev = tmp_path / "rev"
    model = _model_with_external("/etc/hostname", constant_node=True)
    const = model.graph.node[0]
    default = helper.make_attribute("value", const.attribute[0].t)
    function = helper.make_function(
        "com.example",
        "Weights",
        inputs=[],
        outputs=["W"],
        nodes=[helper.make_node("Constant", [], ["W"], value_float=1.0)],
        opset_imports=[helper.make_opsetid("", 17)],
    )
    function.attribute_proto.append(default)
    del model.graph.node[0]
    model.functions.append(function)
    _write(rev, model)
    assert safeload.external_data_locations(rev / "model.onnx") == ["/etc/hostname"]
    with pytest.raises(UnsafeModelError, match="absolute"):
        safeload.check_model(rev, "model.onnx")
