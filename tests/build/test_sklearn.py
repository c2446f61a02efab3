"""scikit-learn models through the Python API, packed into real bundles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.ensemble import RandomForestClassifier
from sklearn.neural_network import MLPClassifier, MLPRegressor

from device_agent.health import check_revision
from edgepack.build import build, build_variants
from edgepack.bundle import read_info, unpack
from edgepack.keys import load_recipient_private_key, load_signing_key, load_signing_public_key
from edgepack.signing import TrustPolicy
from tests.build.helpers import replay_health

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

Digits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@pytest.fixture(scope="module")
def mlp(digits: Digits) -> MLPClassifier:
    x, y, _, _ = digits
    return MLPClassifier(hidden_layer_sizes=(64,), max_iter=200, random_state=0).fit(
        x.astype(np.float64), y
    )


def test_mlp_bundles_per_profile(
    mlp: MLPClassifier, digits: Digits, keys: dict[str, Path], tmp_path: Path
) -> None:
    _, _, xt, yt = digits
    out = tmp_path / "dist"
    result = build(
        mlp,
        name="digits-mlp",
        version="1.0.0",
        hw=["generic-x86_64", "raspberry-pi-4"],
        out_dir=out,
        recipients=[load_recipient_private_key(keys["recipient_key"]).public_key()],
        signer=load_signing_key(keys["sign"]),
        validation={"input": xt.astype(np.float64), "labels": yt},  # float64 is cast, not DOUBLE
        max_accuracy_drop=0.01,
    )
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "digits-mlp-1.0.0-generic-x86_64.epk",
        "digits-mlp-1.0.0-raspberry-pi-4.epk",
        "digits-mlp-1.0.0.build-report.json",
    ]
    assert result.report_path.is_file()
    for bundle in result.bundles:
        info = read_info(bundle)
        meta = info.metadata
        assert meta["quantization"]["recipe"] == "dynamic"
        assert meta["quantization"]["parameters"]["per_channel"] is True
        assert meta["quantization"]["quality"]["accuracy_drop"] <= 0.01
        assert meta["provenance"]["source_digest"].startswith("sha256:")
        assert {"onnx", "onnxruntime", "skl2onnx", "edgepack"} <= set(meta["provenance"]["tools"])
        assert meta["model"]["inputs"] == [
            {"name": "input", "dtype": "float32", "shape": [None, 64]}
        ]
        assert [o["dtype"] for o in meta["model"]["outputs"]] == ["int64", "float32"]  # no ZipMap
        assert meta["health"]["file"] == "health/golden.npz"
        assert meta["health"]["cases"] == 3
        assert meta["health"]["budgets"]["latency_ms"] > 0
        policy = TrustPolicy.from_keys([load_signing_public_key(keys["sign_pub"])])
        dest = tmp_path / f"unpacked-{info.profile}"
        unpack(
            bundle,
            dest,
            recipient_key=load_recipient_private_key(keys["recipient_key"]),
            policy=policy,
        )
        replay_health(dest, meta["health"])
        report = check_revision(
            dest, meta["model"]["path"], meta["health"]
        )  # the agent's own check
        assert report.cases == 3 and not report.failures
    x86 = read_info(result.bundles[0]).metadata["quantization"]["parameters"]
    assert x86["reduce_range"] is True  # the generic x86 profile asks for 7-bit weights


def test_random_forest_has_nothing_to_quantise(digits: Digits, tmp_path: Path) -> None:
    x, y, xt, yt = digits
    forest = RandomForestClassifier(n_estimators=10, max_depth=8, random_state=0).fit(x, y)
    staged = build_variants(
        forest,
        hw="generic-aarch64",
        workdir=tmp_path,
        quantize="auto",
        validation={"input": xt, "labels": yt},
    )
    variant = staged.report.variants[0]
    assert variant.recipe == "none"
    assert "no MatMul/Gemm/Conv weights" in variant.reason
    assert variant.quality["top1_agreement"] == 1.0
    assert staged.report.conversion_quality is not None
    assert staged.report.conversion_quality["top1_agreement"] >= 0.99  # ONNX agrees with sklearn
    replay_health(staged.variants[0].model_dir, staged.variants[0].health)


def test_regressor_cosine_target_and_fp16(digits: Digits, tmp_path: Path) -> None:
    x, _, xt, _ = digits
    target = x[:, :4] @ np.array([1.0, -2.0, 0.5, 3.0])
    regressor = MLPRegressor(hidden_layer_sizes=(32,), max_iter=300, random_state=0).fit(x, target)
    staged = build_variants(
        regressor,
        hw="raspberry-pi-5",
        workdir=tmp_path,
        quantize="fp16",
        validation=xt,
        min_cosine=0.999,
    )
    variant = staged.report.variants[0]
    assert variant.recipe == "fp16"
    assert variant.quality["mean_cosine"] >= 0.999
    assert variant.quality["top1_agreement"] is None  # not a classifier
    assert variant.size_ratio < 0.75
