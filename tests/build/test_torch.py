"""torch models: a digits CNN (int8 accuracy), a transformer with dynamic axes (auto), .pt2 files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from edgepack.build import QualityTargetError, build_variants, validate
from tests.build.conftest import build_args, needs_torch
from tests.build.helpers import cosine, outdir_files, replay_health

pytestmark = [pytest.mark.torch, needs_torch]

Digits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture(scope="module")
def cnn(digits: Digits) -> Any:
    from tests.build.models import train_digits_cnn

    x, y, _, _ = digits
    return train_digits_cnn(x, y)


def test_digits_cnn_int8_loses_under_one_point(cnn: Any, digits: Digits, tmp_path: Path) -> None:
    import torch

    x, _, xt, yt = digits
    images = xt.reshape(-1, 1, 8, 8)
    with torch.no_grad():
        torch_accuracy = float((cnn(torch.from_numpy(images)).argmax(1).numpy() == yt).mean())
    staged = build_variants(
        cnn,
        hw="intel-nuc",
        workdir=tmp_path,
        quantize="auto",
        input_names=["image"],
        dynamic_axes={"image": {0: "batch"}},
        calibration={"image": x[:256].reshape(-1, 1, 8, 8)},
        validation={"image": images, "labels": yt},
        max_accuracy_drop=0.01,
    )
    variant = staged.report.variants[0]
    quality = variant.quality
    assert torch_accuracy > 0.9
    assert quality["reference_accuracy"] == pytest.approx(torch_accuracy, abs=0.002)
    assert variant.recipe in ("dynamic", "static")
    assert quality["reference_accuracy"] - quality["accuracy"] < 0.01
    assert variant.size_ratio < 0.6
    assert [t["recipe"].split()[0] for t in variant.tried][:2] == ["dynamic", "static"]
    replay_health(staged.variants[0].model_dir, staged.variants[0].health)


@pytest.fixture(scope="module")
def encoder_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """The transformer built once with auto at the profile's target (export takes seconds)."""
    import torch

    from tests.build.models import tiny_encoder, token_batches

    model = tiny_encoder()
    batches = token_batches()
    staged = build_variants(
        model,
        hw="raspberry-pi-5",
        workdir=tmp_path_factory.mktemp("encoder"),
        quantize="auto",
        example_inputs=(torch.from_numpy(batches[0]["ids"]),),
        input_names=["ids"],
        output_names=["embedding"],
        dynamic_axes={"ids": {0: "batch", 1: "sequence"}, "embedding": {0: "batch"}},
        validation=batches,
        min_cosine=0.99,
    )
    return model, staged


def test_transformer_auto_beats_onnxruntime_default(
    encoder_build: tuple[Any, Any], tmp_path: Path
) -> None:
    from onnxruntime.quantization import quantize_dynamic

    from tests.build.models import token_batches

    _, staged = encoder_build
    variant = staged.report.variants[0]
    assert staged.report.converter == "torch.onnx (dynamo)"
    assert variant.recipe == "dynamic" and variant.parameters["per_channel"] is True
    default = tmp_path / "default.onnx"
    quantize_dynamic(str(staged.fp32), str(default))  # onnxruntime's defaults: per-tensor
    fp32 = ort.InferenceSession(str(staged.fp32), providers=["CPUExecutionProvider"])
    # Like with like: the variant's quality was measured with the device's exact int8 arithmetic.
    ort_default = validate.open_session(default, ["CPUExecutionProvider"], exact_int8=True)
    default_cos = np.concatenate(
        [cosine(fp32.run(None, b)[0], ort_default.run(None, b)[0]) for b in token_batches()]
    )
    assert variant.quality["mean_cosine"] > float(default_cos.mean())
    assert variant.size_ratio <= 0.4


def test_transformer_keeps_dynamic_axes_and_drops_build_paths(
    encoder_build: tuple[Any, Any],
) -> None:
    import torch

    model, staged = encoder_build
    final = staged.variants[0].model_dir / "model.onnx"
    # What the Raspberry Pi 5 computes; this machine's int8 kernels may saturate (x86 without
    # VNNI), which replay_health below covers.
    session = validate.open_session(final, ["CPUExecutionProvider"], exact_int8=True)
    ids = np.random.default_rng(5).integers(0, 100, (3, 23)).astype(np.int64)
    got = session.run(None, {"ids": ids})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).numpy()
    assert got.shape == (3, 64)
    assert cosine(got, want).min() > 0.98
    exported = b"".join(p.read_bytes() for p in staged.fp32.parent.iterdir())
    shipped = final.read_bytes()
    here = str(Path(__file__).resolve().parent).encode()
    assert b"stack_trace" in exported and here in exported  # what the dynamo exporter leaks
    assert b"stack_trace" not in shipped and here not in shipped and b"site-packages" not in shipped
    assert staged.variants[0].model_info["inputs"][0]["shape"] == ["batch", "sequence"]
    replay_health(staged.variants[0].model_dir, staged.variants[0].health)


def test_auto_keeps_sensitive_nodes_in_fp32(encoder_build: tuple[Any, Any], tmp_path: Path) -> None:
    from tests.build.models import token_batches

    _, staged = encoder_build
    plain = staged.report.variants[0].quality["mean_cosine"]
    target = round(plain + (1.0 - plain) * 0.6, 6)
    again = build_variants(
        staged.fp32,
        hw="raspberry-pi-5",
        workdir=tmp_path / "a",
        quantize="auto",
        validation=token_batches(),
        min_cosine=target,
    )
    variant = again.report.variants[0]
    assert variant.excluded_nodes, variant.reason
    assert variant.quality["mean_cosine"] >= target
    assert "most sensitive" in variant.reason
    assert variant.sensitivity and variant.sensitivity[0]["node"] in variant.excluded_nodes
    assert variant.size_ratio < 0.6
    with pytest.raises(QualityTargetError) as caught:
        build_variants(
            staged.fp32,
            hw="raspberry-pi-5",
            workdir=tmp_path / "b",
            quantize="dynamic",
            validation=token_batches(),
            min_cosine=0.999999,
        )
    assert "best reached: dynamic int8 per-channel with mean cosine" in caught.value.diagnostics()
    assert caught.value.best is not None and caught.value.best.parity.mean_cosine < 0.999999


def test_pt2_file_from_the_cli(
    cnn: Any, digits: Digits, keys: dict[str, Path], tmp_path: Path, cli: Cli
) -> None:
    import torch

    _, _, xt, yt = digits
    images = xt.reshape(-1, 1, 8, 8)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(
        cnn, (torch.from_numpy(images[:4]),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(program, tmp_path / "cnn.pt2")
    samples = tmp_path / "val"
    samples.mkdir()
    for index in range(3):
        np.savez(
            samples / f"b{index}.npz",
            image=images[index * 50 : index * 50 + 50],
            labels=yt[index * 50 : index * 50 + 50],
        )
    out = tmp_path / "dist"
    code, stdout, stderr = cli(
        *build_args(
            tmp_path / "cnn.pt2",
            keys,
            out,
            "--hw",
            "generic-aarch64",
            "--validation",
            samples,
            "--quantize",
            "dynamic",
            "--max-accuracy-drop",
            "0.02",
            "--json",
        )
    )
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["converter"] == "torch.onnx (dynamo)"
    assert report["validation"] == {
        "origin": str(samples),
        "samples": 150,
        "batches": 3,
        "labels": True,
    }
    assert outdir_files(out) == ["demo-1.0.0-generic-aarch64.epk", "demo-1.0.0.build-report.json"]


def test_state_dict_checkpoint_is_refused(
    cnn: Any, keys: dict[str, Path], tmp_path: Path, cli: Cli
) -> None:
    import torch

    torch.save(cnn.state_dict(), tmp_path / "weights.pt")
    out = tmp_path / "dist"
    code, _, stderr = cli(*build_args(tmp_path / "weights.pt", keys, out, "--hw", "generic-x86_64"))
    assert code == 3
    assert "holds" in stderr and "weights, not a model" in stderr and "torch.export.save" in stderr
    assert outdir_files(out) == []


def test_unexportable_operator_is_named(tmp_path: Path) -> None:
    import torch

    from edgepack.errors import InvalidInputError
    from tests.build.models import Unexportable

    with pytest.raises(InvalidInputError) as caught:
        build_variants(
            Unexportable(),
            hw="generic-x86_64",
            workdir=tmp_path,
            example_inputs=(torch.ones(2, 3),),
        )
    message = caught.value.diagnostics()
    assert "edgepacktest::mystery" in message or "edgepacktest.mystery" in message
    assert "either exporter" in message


def test_pt2_with_pickled_objects_needs_the_flag(
    tmp_path: Path, keys: dict[str, Path], cli: Cli
) -> None:
    import zipfile

    path = tmp_path / "model.pt2"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model/data/constants/custom_obj_0", b"\x80\x04K\x01.")
    out = tmp_path / "dist"
    code, _, stderr = cli(*build_args(path, keys, out, "--hw", "generic-x86_64"))
    assert code == 3
    assert "pickled objects" in stderr and "--allow-pickle" in stderr
    assert outdir_files(out) == []


def test_torchscript_exporter_when_dynamo_fails(tmp_path: Path) -> None:
    import torch

    from tests.build.models import Branchy

    staged = build_variants(
        Branchy().eval(),
        hw="generic-x86_64",
        workdir=tmp_path,
        quantize="none",
        example_inputs=(torch.ones(2, 4),),
        dynamic_axes={"x": {0: "batch"}},
    )
    assert staged.report.converter == "torch.onnx (torchscript)"
    assert staged.report.notes and staged.report.notes[0].startswith("dynamo exporter:")
    assert staged.variants[0].model_info["inputs"][0]["shape"][0] == "batch"


def test_an_export_that_baked_a_dynamic_axis_is_rejected(tmp_path: Path) -> None:
    import torch

    from edgepack.errors import InvalidInputError
    from tests.build.models import BranchyEncoder

    with pytest.raises(InvalidInputError) as caught:
        build_variants(
            BranchyEncoder().eval(),
            hw="generic-x86_64",
            workdir=tmp_path,
            example_inputs=(torch.ones(2, 5, 16),),
            dynamic_axes={"x": {0: "batch", 1: "sequence"}},
        )
    message = caught.value.diagnostics()
    assert "torchscript: onnxruntime fails on inputs of shape x[3, 6, 16]" in message
