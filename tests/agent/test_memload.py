"""Models loaded from memory: same outputs as from a path, external data given as buffers,
every hostile location refused, and nothing ever read from a file in the working folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from device_agent import memload, safeload
from device_agent.errors import UnsafeModelError
from tests.agent._support import make_model_dir

W = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
DECOY = W * 100  # what a file of the same name in the working folder holds
X = np.ones((1, 4), np.float32)
XV = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])
YV = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])


def _external(name: str, location: str, array: np.ndarray = W) -> onnx.TensorProto:
    tensor = numpy_helper.from_array(array, name)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(array.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = k, v
    return tensor


def _model(graph: onnx.GraphProto, **kw: object) -> bytes:
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    model = helper.make_model(graph, opset_imports=opsets, **kw)
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _mul_model(location: str, *, constant: bool = False) -> bytes:
    """Y = X * W, W external at ``location`` (an initializer or a Constant node)."""
    w = _external("W", location)
    if constant:
        nodes = [helper.make_node("Constant", [], ["W"], value=w)]
        return _model(
            helper.make_graph([*nodes, helper.make_node("Mul", ["X", "W"], ["Y"])], "g", [XV], [YV])
        )
    return _model(
        helper.make_graph([helper.make_node("Mul", ["X", "W"], ["Y"])], "g", [XV], [YV], [w])
    )


def _files(contents: dict[str, bytes]) -> dict[str, memoryview]:
    """Payload files as views into one buffer, the way atrest.decrypt_bundle hands them out."""
    whole = memoryview(bytearray(b"".join(contents.values())))
    out: dict[str, memoryview] = {}
    offset = 0
    for name, data in contents.items():
        out[name] = whole[offset : offset + len(data)]
        offset += len(data)
    return out


@pytest.fixture
def decoy_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working folder holds decoy files named like the model's external data."""
    cwd = tmp_path / "cwd"
    (cwd / "weights").mkdir(parents=True)
    for rel in ("w.bin", "weights/w.bin", "table.bin"):
        (cwd / rel).write_bytes(DECOY.tobytes())
    monkeypatch.chdir(cwd)
    return cwd


def test_same_outputs_as_the_path_session(tmp_path: Path) -> None:
    make_model_dir(tmp_path, 2.5)
    files = _files({"model.onnx": (tmp_path / "model.onnx").read_bytes()})
    inp = np.array([[0.5, -1.0, 3.0, 7.25]], np.float32)
    by_path = safeload.open_session(tmp_path, "model.onnx").run(None, {"X": inp})[0]
    in_memory = memload.open_session_from_memory(files, "model.onnx").run(None, {"X": inp})[0]
    assert np.array_equal(by_path, in_memory) and np.allclose(in_memory, inp * 2.5 + 1)


def test_external_table_loads_from_memory_not_from_the_working_folder(decoy_cwd: Path) -> None:
    """A Gather over an external table in a subfolder of the model's folder; the decoy
    table.bin in the working folder is never read, and the buffer may be wiped once the
    session exists (onnxruntime copied what it needs)."""
    table = np.arange(64 * 16, dtype=np.float32).reshape(64, 16)
    t = _external("T", "weights/table.bin", table)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["T", "I"], ["Y"])],
        "g",
        [helper.make_tensor_value_info("I", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, 16])],
        [t],
    )
    buffer = bytearray(_model(graph) + table.tobytes())
    model_len = len(buffer) - table.nbytes
    whole = memoryview(buffer)
    files = {"m/model.onnx": whole[:model_len], "m/weights/table.bin": whole[model_len:]}
    assert memload.check_model_bytes(files, "m/model.onnx") == {
        "weights/table.bin": files["m/weights/table.bin"]
    }
    session = memload.open_session_from_memory(files, "m/model.onnx")
    idx = np.array([0, 17, 63], np.int64)
    assert np.array_equal(session.run(None, {"I": idx})[0], table[idx])
    buffer[:] = bytes(len(buffer))  # what DecryptedRevision.wipe does
    assert np.array_equal(session.run(None, {"I": idx})[0], table[idx])


def test_constant_node_external_data_loads_from_memory(decoy_cwd: Path) -> None:
    files = _files({"model.onnx": _mul_model("w.bin", constant=True), "w.bin": W.tobytes()})
    out = memload.open_session_from_memory(files, "model.onnx").run(None, {"X": X})[0]
    assert np.array_equal(out, W)


def test_onnxruntime_from_bytes_reads_the_working_folder(decoy_cwd: Path) -> None:
    """The hazard the module exists for: with default options and no in-memory table,
    onnxruntime opens a file of the location's name in the working folder (the control);
    memload's session builder sets the table even when it has nothing to put in it, so
    the same model fails instead."""
    table = np.arange(64 * 16, dtype=np.float32).reshape(64, 16)
    (decoy_cwd / "table.bin").write_bytes((table + 1000).tobytes())
    graph = helper.make_graph(
        [helper.make_node("Gather", ["T", "I"], ["Y"])],
        "g",
        [helper.make_tensor_value_info("I", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 16])],
        [_external("T", "table.bin", table)],
    )
    model = _model(graph)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    idx = np.array([0, 63], np.int64)
    assert np.array_equal(session.run(None, {"I": idx})[0], table[idx] + 1000)
    with pytest.raises(Exception, match="not found from the table"):
        memload._create_session(model, {}, None)


def test_external_data_missing_from_memory_is_refused_not_read_from_cwd(
    decoy_cwd: Path,
) -> None:
    files = {"model.onnx": memoryview(_mul_model("w.bin"))}
    with pytest.raises(UnsafeModelError, match="names no file of the revision's payload"):
        memload.open_session_from_memory(files, "model.onnx")


@pytest.mark.parametrize(
    ("location", "why"),
    [
        ("/etc/hostname", "absolute"),
        ("/w.bin", "absolute"),
        ("C:\\w.bin", "backslash"),
        ("C:w.bin", "absolute or names a drive"),
        ("c:/w.bin", "absolute or names a drive"),
        ("w.bin:stream", "absolute or names a drive"),
        ("\\\\server\\share\\w.bin", "backslash"),
        ("weights\\w.bin", "backslash"),
        ("..\\w.bin", "backslash"),
        ("../w.bin", "'..'"),
        ("weights/../../w.bin", "'..'"),
        ("w.bin\x00.txt", "NUL"),
        ("", "empty"),
        ("missing.bin", "names no file"),
        ("meta/bundle.json", "names no file"),
    ],
)
def test_hostile_locations_refused(decoy_cwd: Path, location: str, why: str) -> None:
    files = {"model.onnx": memoryview(_mul_model(location)), "w.bin": memoryview(W.tobytes())}
    with pytest.raises(UnsafeModelError, match=why):
        memload.check_model_bytes(files, "model.onnx")
    with pytest.raises(UnsafeModelError, match=why):
        memload.open_session_from_memory(files, "model.onnx")


def test_a_payload_file_outside_the_models_folder_is_not_found(decoy_cwd: Path) -> None:
    """Locations resolve against the model's folder: ``w.bin`` of ``m/model.onnx`` is
    ``m/w.bin``, not the payload's top-level ``w.bin``."""
    files = {"m/model.onnx": memoryview(_mul_model("w.bin")), "w.bin": memoryview(W.tobytes())}
    with pytest.raises(UnsafeModelError, match=r"names no file .*\(m/w\.bin\)"):
        memload.check_model_bytes(files, "m/model.onnx")
    files["m/w.bin"] = files.pop("w.bin")
    out = memload.open_session_from_memory(files, "m/model.onnx").run(None, {"X": X})[0]
    assert np.array_equal(out, W)


@pytest.mark.parametrize(
    ("model_rel", "why"),
    [("../model.onnx", "'..'"), ("/model.onnx", "absolute"), ("other.onnx", "not in the")],
)
def test_the_model_path_itself_is_checked(model_rel: str, why: str) -> None:
    files = {"model.onnx": memoryview(_mul_model("w.bin")), "w.bin": memoryview(W.tobytes())}
    with pytest.raises(UnsafeModelError, match=why):
        memload.check_model_bytes(files, model_rel)


def test_not_onnx_is_refused() -> None:
    files = {"model.onnx": memoryview(b"\x0a\xff\xff\xff\xff\x0f not protobuf")}
    with pytest.raises(UnsafeModelError, match="not"):
        memload.open_session_from_memory(files, "model.onnx")
    with pytest.raises(UnsafeModelError, match="empty"):
        memload.open_session_from_memory({"model.onnx": memoryview(b"")}, "model.onnx")


def _if_model(*, constant: bool) -> bytes:
    y1 = helper.make_tensor_value_info("Y1", TensorProto.FLOAT, [1, 4])
    if constant:
        nodes = [helper.make_node("Constant", [], ["W"], value=_external("Wc", "w.bin"))]
        then = helper.make_graph(
            [*nodes, helper.make_node("Mul", ["X", "W"], ["Y1"])], "t", [], [y1]
        )
    else:
        then = helper.make_graph(
            [helper.make_node("Mul", ["X", "W"], ["Y1"])], "t", [], [y1], [_external("W", "w.bin")]
        )
    y2 = helper.make_tensor_value_info("Y2", TensorProto.FLOAT, [1, 4])
    other = helper.make_graph([helper.make_node("Identity", ["X"], ["Y2"])], "e", [], [y2])
    node = helper.make_node("If", ["C"], ["Y"], then_branch=then, else_branch=other)
    c = helper.make_tensor_value_info("C", TensorProto.BOOL, [])
    return _model(helper.make_graph([node], "g", [XV, c], [YV]))


def _sparse_model() -> bytes:
    values = _external("S", "w.bin")
    values.dims[:] = [4]
    indices = numpy_helper.from_array(np.arange(4, dtype=np.int64), "SI")
    graph = helper.make_graph([helper.make_node("Mul", ["X", "S"], ["Y"])], "g", [XV], [YV])
    graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [1, 4]))
    return _model(graph)


def _constant_of_shape_model() -> bytes:
    one = np.array([1.0], np.float32)
    shape = numpy_helper.from_array(np.array([1, 4], np.int64), "SH")
    nodes = [
        helper.make_node("ConstantOfShape", ["SH"], ["W"], value=_external("v", "w.bin", one)),
        helper.make_node("Mul", ["X", "W"], ["Y"]),
    ]
    return _model(helper.make_graph(nodes, "g", [XV], [YV], [shape]))


def _function_model() -> bytes:
    function = helper.make_function(
        "com.example",
        "Weights",
        inputs=[],
        outputs=["W"],
        nodes=[helper.make_node("Constant", [], ["W"], value=_external("Wf", "w.bin"))],
        opset_imports=[helper.make_opsetid("", 17)],
    )
    nodes = [
        helper.make_node("Weights", [], ["W"], domain="com.example"),
        helper.make_node("Mul", ["X", "W"], ["Y"]),
    ]
    return _model(helper.make_graph(nodes, "g", [XV], [YV]), functions=[function])


NESTED = {
    "if-initializer": lambda: _if_model(constant=False),
    "if-constant": lambda: _if_model(constant=True),
    "sparse-initializer": _sparse_model,
    "constant-of-shape": _constant_of_shape_model,
    "function-body": _function_model,
}


@pytest.mark.parametrize("shape", sorted(NESTED))
def test_external_data_onnxruntime_would_read_from_a_file_is_refused(
    decoy_cwd: Path, shape: str
) -> None:
    """onnxruntime's in-memory table covers only the main graph: a tensor elsewhere is read
    from the working folder even when its file is in the table (the first half shows it,
    with optimizations off so nothing else stops it), so such a model is refused."""
    model = NESTED[shape]()
    data = W.tobytes() if shape != "constant-of-shape" else np.float32(1.0).tobytes()
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    buffer = bytearray(data)
    options.add_external_initializers_from_files_in_memory(["w.bin"], [buffer], [len(buffer)])
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    feeds = {"X": X, "C": np.array(True)}
    out = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]
    assert np.allclose(out, DECOY if shape != "constant-of-shape" else DECOY[0, 0])
    files = {"model.onnx": memoryview(model), "w.bin": memoryview(data)}
    with pytest.raises(UnsafeModelError, match="outside the main graph's initializers"):
        memload.open_session_from_memory(files, "model.onnx")


def test_locations_are_looked_up_as_written(decoy_cwd: Path) -> None:
    """``./w.bin`` and ``weights//w.bin`` name payload files ``w.bin`` and ``weights/w.bin``;
    onnxruntime gets them under the names the model writes, so it finds them in memory."""
    for location, payload in (("./w.bin", "w.bin"), ("weights//w.bin", "weights/w.bin")):
        files = {"model.onnx": memoryview(_mul_model(location)), payload: memoryview(W.tobytes())}
        assert list(memload.check_model_bytes(files, "model.onnx")) == [location]
        out = memload.open_session_from_memory(files, "model.onnx").run(None, {"X": X})[0]
        assert np.array_equal(out, W), location


def test_the_session_keeps_no_copy_of_the_model_bytes() -> None:
    """A model holding 16 MB of weights inside: once the session exists and the decrypted
    buffer is wiped and dropped, no Python object still holds the plaintext model
    (onnxruntime's binding would keep a bytes copy for re-creating the session)."""
    import gc
    import tracemalloc

    table = np.random.default_rng(0).random((4096, 1024), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["T", "I"], ["Y"])],
        "g",
        [helper.make_tensor_value_info("I", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 1024])],
        [numpy_helper.from_array(table, "T")],
    )
    buffer = bytearray(_model(graph))
    tracemalloc.start()
    try:
        session = memload.open_session_from_memory({"model.onnx": memoryview(buffer)}, "model.onnx")
        buffer[:] = bytes(len(buffer))
        del buffer
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 2**20, f"{held} bytes still held by Python objects"
    assert np.array_equal(session.run(None, {"I": np.array([7])})[0], table[7:8])
