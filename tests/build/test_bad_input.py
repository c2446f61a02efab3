"""Bad input: each a clear one-line error, a non-zero exit, and nothing in OUTDIR."""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable
from pathlib import Path

import joblib
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from sklearn.neural_network import MLPClassifier

from tests.build.conftest import build_args
from tests.build.helpers import outdir_files

Cli = Callable[..., tuple[int, str, str]]
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

Digits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def linear_model(folder: Path, *, external: str | None = None, features: int = 16) -> Path:
    """y = relu(x·W + b) built with onnx.helper; W optionally stored as external data."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((features, 8)).astype(np.float32), "W")
    bias = numpy_helper.from_array(np.zeros(8, np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="matmul"),
            helper.make_node("Add", ["h", "b"], ["a"], name="add"),
            helper.make_node("Relu", ["a"], ["y"], name="relu"),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    if external:
        onnx.save_model(
            model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0
        )
        if external != "weights.bin":  # point the tensor at a hostile location
            model = onnx.load(str(path), load_external_data=False)
            for tensor in model.graph.initializer:
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = external
            onnx.save_model(model, str(path))
    else:
        onnx.save_model(model, str(path))
    return path


def samples(folder: Path, features: int = 16, dtype: str = "float32") -> Path:
    path = folder / "val.npz"
    np.savez(path, x=np.random.default_rng(1).standard_normal((32, features)).astype(dtype))
    return path


def test_external_data_model_builds(tmp_path: Path, keys: dict[str, Path], cli: Cli) -> None:
    model = linear_model(tmp_path / "m", external="weights.bin")
    assert (tmp_path / "m" / "weights.bin").is_file()
    out = tmp_path / "dist"
    code, _, stderr = cli(
        *build_args(model, keys, out, "--hw", "generic-x86_64", "--validation", samples(tmp_path))
    )
    assert code == 0, stderr
    assert outdir_files(out) == ["demo-1.0.0-generic-x86_64.epk", "demo-1.0.0.build-report.json"]


@pytest.mark.parametrize(
    "location",
    ["/etc/passwd", "../outside.bin", "sub/../../outside.bin", "C:\\weights.bin"],
)
def test_external_data_outside_the_folder_is_refused(
    location: str, tmp_path: Path, keys: dict[str, Path], cli: Cli
) -> None:
    (tmp_path / "outside.bin").write_bytes(b"\0" * 1024)
    model = linear_model(tmp_path / "m", external=location)
    out = tmp_path / "dist"
    code, _, stderr = cli(*build_args(model, keys, out, "--hw", "generic-x86_64"))
    assert code == 3
    assert "external data" in stderr and location in stderr.replace("\\\\", "\\")
    assert outdir_files(out) == []


def test_external_data_symlink_escaping_is_refused(
    tmp_path: Path, keys: dict[str, Path], cli: Cli
) -> None:
    model = linear_model(tmp_path / "m", external="weights.bin")
    secret = tmp_path / "secret.bin"
    (tmp_path / "m" / "weights.bin").rename(secret)
    (tmp_path / "m" / "weights.bin").symlink_to(secret)
    code, _, stderr = cli(*build_args(model, keys, tmp_path / "dist", "--hw", "generic-x86_64"))
    assert code == 3 and "outside the model's folder" in stderr


@pytest.mark.parametrize("content", [b"", b"this is not a model\n", b"\x08\x07garbage" * 40])
def test_non_model_file(content: bytes, tmp_path: Path, keys: dict[str, Path], cli: Cli) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    out = tmp_path / "dist"
    code, _, stderr = cli(*build_args(path, keys, out, "--hw", "generic-x86_64"))
    assert code == 3
    assert "is not an ONNX model" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert outdir_files(out) == []


def test_unreadable_and_missing_files(tmp_path: Path, keys: dict[str, Path], cli: Cli) -> None:
    code, _, stderr = cli(
        *build_args(tmp_path / "nope.onnx", keys, tmp_path / "dist", "--hw", "generic-x86_64")
    )
    assert code == 3 and "no such file" in stderr
    locked = linear_model(tmp_path / "m")
    locked.chmod(0)
    try:
        code, _, stderr = cli(
            *build_args(locked, keys, tmp_path / "dist", "--hw", "generic-x86_64")
        )
        if code != 0:  # root reads anything; elsewhere this is the permission error
            assert code == 3 and "permission denied" in stderr
    finally:
        locked.chmod(0o644)
    assert outdir_files(tmp_path / "dist") == [] or code == 0


class Boom:
    """Unpickling this runs code: the attack --allow-pickle guards against."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("PWNED-BY-PICKLE",))


def test_pickle_needs_the_flag(tmp_path: Path, keys: dict[str, Path], cli: Cli) -> None:
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(Boom()))
    out = tmp_path / "dist"
    code, stdout, stderr = cli(*build_args(path, keys, out, "--hw", "generic-x86_64"))
    assert code == 3
    assert "--allow-pickle" in stderr and "arbitrary code" in stderr
    assert "PWNED" not in stdout
    assert outdir_files(out) == []


def test_joblib_with_the_flag_warns_and_builds(
    digits: Digits, tmp_path: Path, keys: dict[str, Path], cli: Cli
) -> None:
    x, y, xt, yt = digits
    model = MLPClassifier(hidden_layer_sizes=(16,), max_iter=50, random_state=0).fit(x, y)
    joblib.dump(model, tmp_path / "model.joblib")
    np.savez(tmp_path / "val.npz", input=xt, labels=yt)
    out = tmp_path / "dist"
    code, stdout, stderr = cli(
        *build_args(
            tmp_path / "model.joblib",
            keys,
            out,
            "--hw",
            "raspberry-pi-4",
            "--allow-pickle",
            "--validation",
            tmp_path / "val.npz",
        )
    )
    assert code == 0, stderr
    assert "arbitrary code execution" in stderr
    assert "raspberry-pi-4" in stdout and "dynamic int8 per-channel" in stdout  # the human table
    assert outdir_files(out) == ["demo-1.0.0-raspberry-pi-4.epk", "demo-1.0.0.build-report.json"]


def test_unknown_profile(tmp_path: Path, keys: dict[str, Path], cli: Cli) -> None:
    out = tmp_path / "dist"
    code, _, stderr = cli(
        *build_args(linear_model(tmp_path / "m"), keys, out, "--hw", "toaster-9000")
    )
    assert code == 3 and "toaster-9000" in stderr
    assert outdir_files(out) == []


@pytest.mark.parametrize(
    ("features", "dtype", "expected"),
    [(16, "int32", "has dtype int32 but the model expects float32"), (12, "float32", "on axis 1")],
)
def test_calibration_data_of_the_wrong_shape_or_dtype(
    features: int, dtype: str, expected: str, tmp_path: Path, keys: dict[str, Path], cli: Cli
) -> None:
    model = linear_model(tmp_path / "m")
    bad = samples(tmp_path, features, dtype)
    out = tmp_path / "dist"
    code, _, stderr = cli(
        *build_args(
            model, keys, out, "--hw", "generic-x86_64", "--quantize", "static", "--calibration", bad
        )
    )
    assert code == 3 and "calibration data" in stderr and expected in stderr
    assert outdir_files(out) == []


def test_pickled_sample_data_is_refused(tmp_path: Path, keys: dict[str, Path], cli: Cli) -> None:
    bad = tmp_path / "val.npy"
    np.save(bad, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    code, _, stderr = cli(
        *build_args(
            linear_model(tmp_path / "m"),
            keys,
            tmp_path / "dist",
            "--hw",
            "generic-x86_64",
            "--validation",
            bad,
        )
    )
    assert code == 3 and "cannot read validation file" in stderr


def test_quality_target_no_recipe_meets(tmp_path: Path, keys: dict[str, Path], cli: Cli) -> None:
    out = tmp_path / "dist"
    code, _, stderr = cli(
        *build_args(
            linear_model(tmp_path / "m"),
            keys,
            out,
            "--hw",
            "generic-x86_64",
            "--quantize",
            "auto",
            "--min-cosine",
            "0.9999999",
            "--validation",
            samples(tmp_path),
        )
    )
    assert code == 1
    assert "best reached: dynamic int8 per-channel" in stderr and "mean cosine 0.99" in stderr
    assert outdir_files(out) == []


def test_operator_the_runtime_lacks(tmp_path: Path, keys: dict[str, Path], cli: Cli) -> None:
    graph = helper.make_graph(
        [helper.make_node("Acosh", ["x"], ["y"], name="acosh")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["batch", 4])],
    )
    folder = tmp_path / "m"
    folder.mkdir()
    onnx.save_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
        str(folder / "model.onnx"),
    )
    np.save(tmp_path / "val.npy", np.full((4, 4), 2.0))
    out = tmp_path / "dist"
    code, _, stderr = cli(
        *build_args(
            folder / "model.onnx",
            keys,
            out,
            "--hw",
            "raspberry-pi-4",
            "--validation",
            tmp_path / "val.npy",
        )
    )
    assert code == 3
    assert "no kernel for Acosh (opset 9, node 'acosh')" in stderr
    assert outdir_files(out) == []


def test_checker_catches_type_errors(tmp_path: Path, keys: dict[str, Path], cli: Cli) -> None:
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "k"], ["y"], name="add")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.ones(2, np.int64), "k")],
    )
    folder = tmp_path / "m"
    folder.mkdir()
    onnx.save_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
        str(folder / "model.onnx"),
    )
    code, _, stderr = cli(
        *build_args(folder / "model.onnx", keys, tmp_path / "dist", "--hw", "generic-x86_64")
    )
    assert code == 3 and "fails onnx's checker" in stderr


def test_bad_recipe_and_bad_name(tmp_path: Path, keys: dict[str, Path], cli: Cli) -> None:
    model = linear_model(tmp_path / "m")
    code, _, stderr = cli(
        *build_args(model, keys, tmp_path / "dist", "--hw", "generic-x86_64", "--quantize", "int3")
    )
    assert code == 3 and "unknown recipe 'int3'" in stderr
    args = build_args(model, keys, tmp_path / "dist", "--hw", "generic-x86_64")
    args[args.index("demo")] = "Bad Name"
    code, _, stderr = cli(*args)
    assert code == 3 and "invalid model name" in stderr
    assert outdir_files(tmp_path / "dist") == []


def test_missing_torch_says_how_to_install_it(
    tmp_path: Path, keys: dict[str, Path], cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    path = tmp_path / "model.pt2"
    path.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    out = tmp_path / "dist"
    code, _, stderr = cli(*build_args(path, keys, out, "--hw", "generic-x86_64"))
    assert code == 3
    assert "PyTorch is not installed" in stderr and "pip install 'edgepack[torch]'" in stderr
    assert outdir_files(out) == []
