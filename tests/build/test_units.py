"""Smaller behaviours: sanitising, determinism, private working directories, samples, big models."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgepack.build import api, build_variants, quantize, validate
from edgepack.build.healthset import tolerances
from edgepack.build.samples import TensorSpec, bind, read_raw
from edgepack.build.sanitize import sanitize
from edgepack.build.validate import Parity
from edgepack.errors import InvalidInputError
from tests.build.helpers import replay_health
from tests.build.test_bad_input import linear_model


def test_sanitize_strips_paths_and_traces(tmp_path: Path) -> None:
    model = onnx.load(str(linear_model(tmp_path)))
    leak = 'File "/home/builder/src/model.py", line 3, in forward'
    model.doc_string = leak
    model.graph.doc_string = leak
    node = model.graph.node[0]
    node.doc_string = leak
    entry = node.metadata_props.add()
    entry.key, entry.value = "pkg.torch.onnx.stack_trace", leak
    for key, value in (("source_path", "/home/builder/src/model.py"), ("licence", "Apache-2.0")):
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    removed = sanitize(model)
    data = model.SerializeToString()
    assert removed == 5
    assert b"/home/builder" not in data and b"stack_trace" not in data
    assert [(p.key, p.value) for p in model.metadata_props] == [("licence", "Apache-2.0")]


def test_same_input_gives_the_same_model_directory(tmp_path: Path) -> None:
    model = linear_model(tmp_path / "m")
    val = {"x": np.random.default_rng(2).standard_normal((24, 16)).astype(np.float32)}
    dirs = []
    metadata = []
    for run in ("a", "b"):
        staged = build_variants(
            model, hw="raspberry-pi-4", workdir=tmp_path / run, validation=val, quantize="auto"
        )
        variant = staged.variants[0]
        dirs.append(variant.model_dir)
        metadata.append(
            (variant.model_info, variant.quantization, variant.provenance, variant.health)
        )
        assert variant.quantization["recipe"] == "dynamic"
        # Exact int8 keeps this model at 0.99996 whatever the build machine's kernels do.
        assert variant.quantization["quality"]["mean_cosine"] > 0.999
    assert metadata[0] == metadata[1]  # what goes into the bundle holds no timings
    for name in ("model.onnx", "health/golden.npz"):
        assert (dirs[0] / name).read_bytes() == (dirs[1] / name).read_bytes()
    with np.load(dirs[0] / "health/golden.npz") as golden:
        assert sorted(golden.files) == sorted(
            f"case{i}_{kind}0" for i in range(3) for kind in ("in", "out")
        )
        assert golden["case0_in0"].shape == (4, 16)  # each case an exact small batch
    replay_health(dirs[0], metadata[0][3])  # device goldens, replayed on this machine's kernels


def test_quality_is_measured_with_exact_int8_arithmetic(tmp_path: Path) -> None:
    # AVX2 without VNNI adds u8×s8 product pairs in saturating int16: activations near 255
    # times per-channel weights near ±127 overflow it. The device (ARM, VNNI) does not.
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = linear_model(tmp_path)
    quantised = tmp_path / "q.onnx"
    quantize_dynamic(str(model), str(quantised), per_channel=True, weight_type=QuantType.QInt8)
    weights = {
        t.name: numpy_helper.to_array(t) for t in onnx.load(str(quantised)).graph.initializer
    }
    w_int, w_scale = weights["W_quantized"].astype(np.int64), weights["W_scale"].astype(np.float64)
    x = np.random.default_rng(2).standard_normal((24, 16)).astype(np.float32)
    low, high = min(0.0, float(x.min())), max(0.0, float(x.max()))  # DynamicQuantizeLinear
    x_scale = np.float32((high - low) / 255)
    x_zero = int(np.clip(np.round(-low / x_scale), 0, 255))
    x_int = np.clip(np.round(x / x_scale) + x_zero, 0, 255).astype(np.int64)
    pairs = x_int[:, 0::2, None] * w_int[0::2] + x_int[:, 1::2, None] * w_int[1::2]
    assert np.abs(pairs).max() > 2**15 - 1  # a saturating kernel would get this model wrong
    want = np.maximum((x_int - x_zero) @ w_int * float(x_scale) * w_scale, 0)
    session = validate.open_session(quantised, ["CPUExecutionProvider"], exact_int8=True)
    got = validate.run(session, [{"x": x}])[0][0]
    assert np.allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("architecture", "features", "reduce_range", "exact"),
    [
        ("aarch64", ("asimd",), False, True),
        ("x86_64", ("avx2", "avx512_vnni"), False, True),
        ("x86_64", ("sse4_2",), True, True),
        ("x86_64", ("avx2",), False, False),
    ],
)
def test_which_devices_compute_int8_exactly(
    architecture: str, features: tuple[str, ...], reduce_range: bool, exact: bool
) -> None:
    assert quantize.device_int8_is_exact(architecture, features, reduce_range) is exact


def test_tools_leave_nothing_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = linear_model(tmp_path / "m")
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    calib = {"x": np.random.default_rng(3).standard_normal((32, 16)).astype(np.float32)}
    build_variants(
        model,
        hw="generic-x86_64",
        workdir=tmp_path / "w",
        quantize="static",
        calibration=calib,
        validation=calib,
        min_cosine=0.9,
    )
    assert list(here.iterdir()) == []
    assert Path.cwd() == here


def test_big_models_keep_their_weights_in_a_side_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Writing 2 GiB in a unit test is out of budget (benchmarks/bench_quantize.py --large
    # builds a real one); the same code path runs here with the threshold lowered.
    monkeypatch.setattr(quantize, "LARGE_MODEL", 256)
    monkeypatch.setattr(api, "LARGE_MODEL", 256)
    model = linear_model(tmp_path / "m", external="weights.bin", features=256)
    val = {"x": np.random.default_rng(4).standard_normal((8, 256)).astype(np.float32)}
    for recipe in ("none", "dynamic", "fp16"):
        staged = build_variants(
            model, hw="generic-aarch64", workdir=tmp_path / recipe, quantize=recipe, validation=val
        )
        folder = staged.variants[0].model_dir
        assert (folder / "model.onnx.data").is_file(), recipe
        replay_health(folder, staged.variants[0].health)


def test_samples_directory_of_variable_length_batches(tmp_path: Path) -> None:
    spec = [TensorSpec("ids", "int64", ("batch", "sequence"))]
    folder = tmp_path / "samples"
    folder.mkdir()
    for index, length in enumerate((5, 9, 7)):
        np.save(folder / f"{index}.npy", np.zeros((2, length), np.int64))
    raw, labels, origin = read_raw(folder, "validation")
    bound = bind(raw, labels, origin, spec, "validation")
    assert [b["ids"].shape for b in bound.batches] == [(2, 5), (2, 9), (2, 7)]
    with pytest.raises(InvalidInputError, match=r"3 labels for 6 samples"):
        bind(raw, np.zeros(3), origin, spec, "validation")
    with pytest.raises(InvalidInputError, match="takes inputs"):
        bind([{"a": np.zeros((2, 3)), "b": np.zeros((2, 3))}], None, "x", spec, "validation")
    big = bind([{"arr_0": np.zeros((40, 3), np.int64)}], None, "x", spec, "validation")
    assert [len(b["ids"]) for b in big.batches] == [16, 16, 8]


def test_tolerances_follow_the_measured_error() -> None:
    outputs = [[np.array([[10.0, -3.0]], np.float32)]]
    exact = tolerances(Parity(0.0, 1.0, 1.0, None), outputs)
    assert exact == {"atol": 1e-3, "rtol": 1e-3, "label_agreement": 1.0}
    noisy = tolerances(Parity(0.05, 0.999, 0.99, 0.98), outputs)
    assert noisy["atol"] == pytest.approx(0.1)
    assert noisy["label_agreement"] == pytest.approx(0.96)


def test_min_metric_needs_a_metric(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="needs a metric"):
        build_variants(
            linear_model(tmp_path), hw="generic-x86_64", workdir=tmp_path / "w", min_metric=0.5
        )


def test_user_metric_is_a_quality_target(tmp_path: Path) -> None:
    model = linear_model(tmp_path / "m")
    val = {"x": np.random.default_rng(5).standard_normal((16, 16)).astype(np.float32)}
    seen: list[int] = []

    def never_good(reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]]) -> float:
        seen.append(len(candidate))
        return 0.0

    with pytest.raises(quantize.QualityTargetError, match=r"metric 0 < 0\.5"):
        build_variants(
            model,
            hw="generic-x86_64",
            workdir=tmp_path / "w",
            quantize="dynamic",
            validation=val,
            metric=never_good,
            min_metric=0.5,
        )
    assert seen == [1]
    assert not os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")


def test_report_renders_free_text_literally(tmp_path: Path) -> None:
    import io

    from rich.console import Console

    from edgepack.build.report import render

    model = linear_model(tmp_path / "m")
    staged = build_variants(model, hw="generic-x86_64", workdir=tmp_path / "w", quantize="none")
    staged.report.notes.append("shape ids[9, 18] and [bold]not markup[/bold]")
    buffer = io.StringIO()
    render(staged.report, Console(file=buffer, width=200))
    text = buffer.getvalue()
    assert "ids[9, 18]" in text and "[bold]not markup[/bold]" in text
    assert "fp32 (no quantisation)" in text and "generic-x86_64" in text
    assert staged.report.as_dict()["variants"][0]["size_ratio"] == pytest.approx(1.0, abs=0.05)


def test_report_fits_an_80_column_terminal_without_cutting_profile_names(tmp_path: Path) -> None:
    import io

    from rich.console import Console

    from edgepack.build.report import render

    model = linear_model(tmp_path / "m")
    staged = build_variants(model, hw="generic-x86_64", workdir=tmp_path / "w", quantize="none")
    longest = "raspberry-pi-4"
    for variant in staged.report.variants:
        variant.profile, variant.bundle = longest, f"dist/m-1.0.0-{longest}.epk"
    buffer = io.StringIO()
    render(staged.report, Console(file=buffer, width=80))
    lines = buffer.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines)
    rows = [line for line in lines if line.startswith("│") and longest in line]
    assert len(rows) == 2, lines  # whole, once in each table
    assert any(f"m-1.0.0-{longest}.epk" in line for line in lines)
