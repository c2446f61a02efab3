"""`edgepack build` records a signed, bounded monitoring reference of the final model."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
from sklearn.neural_network import MLPClassifier

from edgepack import monitoring
from edgepack.build import api
from edgepack.bundle import check_signature, read_info
from edgepack.cli import main
from edgepack.errors import BundleFormatError, VerificationError
from edgepack.keys import load_signing_public_key
from edgepack.signing import TrustPolicy
from tests.build.conftest import build_args, needs_torch
from tests.build.helpers import outdir_files
from tests.bundle import surgery

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

Digits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
Cli = Callable[..., tuple[int, str, str]]
BUNDLE = "demo-1.0.0-raspberry-pi-4.epk"


@pytest.fixture(scope="module")
def digits_model(digits: Digits, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits MLP saved with joblib, and its held-out rows as validation data beside it."""
    x, y, xt, yt = digits
    folder = tmp_path_factory.mktemp("digits")
    model = MLPClassifier(hidden_layer_sizes=(16,), max_iter=50, random_state=0).fit(x, y)
    joblib.dump(model, folder / "model.joblib")
    np.savez(folder / "val.npz", input=xt, labels=yt)
    return folder / "model.joblib"


@pytest.fixture(scope="module")
def built(
    digits_model: Path, keys: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, float]]:
    """One real build with two threshold overrides; the bundle and the reference's cost (s)."""
    out = tmp_path_factory.mktemp("built") / "dist"
    spent: list[float] = []
    real = api._reference

    def timed(*args: Any) -> Any:
        start = time.perf_counter()
        result = real(*args)
        spent.append(time.perf_counter() - start)
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(api, "_reference", timed)
        code = main(
            [
                str(a)
                for a in build_args(
                    digits_model,
                    keys,
                    out,
                    "--hw",
                    "raspberry-pi-4",
                    "--allow-pickle",
                    "--validation",
                    digits_model.parent / "val.npz",
                    "--monitor-threshold",
                    "drift_psi=0.3",
                    "--monitor-threshold",
                    "window=200",
                )
            ]
        )
    assert code == 0
    assert len(spent) == 1
    yield out / BUNDLE, spent[0]


def test_the_reference_profiles_the_digits_model_within_its_bounds(
    built: tuple[Path, float], digits: Digits
) -> None:
    bundle, _ = built
    meta = read_info(bundle).metadata
    assert meta["format_version"] == 2
    reference = meta["monitoring"]
    assert monitoring.check_reference(reference) == reference
    assert reference["rows"] == len(digits[2])
    assert list(reference["inputs"]) == ["input"]
    assert reference["inputs"]["input"]["kind"] == "columns"
    assert reference["inputs"]["input"]["features"] == 64
    assert {n: b["kind"] for n, b in reference["outputs"].items()} == {
        "label": "classes",
        "probabilities": "confidence",
    }
    assert reference["outputs"]["label"]["classes"] == list(range(10))
    assert 0.5 < reference["outputs"]["probabilities"]["mean"] <= 1.0
    size = len(monitoring.canonical(reference))
    assert size <= monitoring.MAX_REFERENCE_BYTES
    assert size < 16 * 1024  # 64 features of 10 bins: about 8 KiB
    expected = {**monitoring.DEFAULT_THRESHOLDS, "drift_psi": 0.3, "window": 200.0}
    assert reference["thresholds"] == expected


def _number_lists(value: Any) -> Iterator[list[float]]:
    if isinstance(value, dict):
        for item in value.values():
            yield from _number_lists(item)
    elif isinstance(value, list):
        if value and all(isinstance(v, int | float) for v in value):
            yield value
        for item in value:
            yield from _number_lists(item)


def test_no_validation_row_is_in_the_reference(built: tuple[Path, float], digits: Digits) -> None:
    reference = read_info(built[0]).metadata["monitoring"]
    rows = np.unique(digits[2].astype(np.float64), axis=0)
    lists = list(_number_lists(reference))
    assert lists
    # Nothing as long as a feature's column of values: only per-feature summaries.
    assert max(len(v) for v in lists) <= 64 < len(digits[2])
    for values in lists:
        if len(values) == rows.shape[1]:
            assert not np.isclose(rows, np.asarray(values), rtol=1e-4, atol=1e-6).all(axis=1).any()


def test_the_reference_costs_well_under_a_second(built: tuple[Path, float]) -> None:
    assert built[1] < 0.5


def test_the_reference_is_covered_by_the_producer_signature(
    built: tuple[Path, float], keys: dict[str, Path]
) -> None:
    bundle, _ = built
    policy = TrustPolicy.from_keys([load_signing_public_key(keys["sign_pub"])])
    check_signature(read_info(bundle), policy)

    def shift(doc: dict[str, Any]) -> None:
        doc["monitoring"]["inputs"]["input"]["mean"][10] += 0.25  # a forged, still valid reference

    tampered = surgery.edit_json(bundle, "meta/bundle.json", shift)
    info = read_info(tampered)
    monitoring.check_reference(info.metadata["monitoring"])
    with pytest.raises(VerificationError, match="does not match this bundle's metadata"):
        check_signature(info, policy)


def test_a_malformed_reference_is_a_format_error(built: tuple[Path, float]) -> None:
    def garble(doc: dict[str, Any]) -> None:
        doc["monitoring"]["inputs"]["input"]["probs"] = [[0.1] * 10]

    with pytest.raises(BundleFormatError, match="monitoring"):
        read_info(surgery.edit_json(built[0], "meta/bundle.json", garble))


def test_inspect_shows_the_reference(built: tuple[Path, float], cli: Cli) -> None:
    code, out, err = cli("inspect", built[0])
    assert code == 0, err
    assert "monitoring  reference of 597 rows" in out
    assert "input     input: columns, 64 feature(s)" in out
    assert "output    label: classes" in out
    assert "output    probabilities: confidence" in out
    assert "drift_psi=0.3" in out and "window=200" in out
    code, out, err = cli("inspect", "--json", built[0])
    assert code == 0, err
    shown = json.loads(out)["metadata"]["monitoring"]
    assert shown == read_info(built[0]).metadata["monitoring"]


def test_no_monitoring_records_none(
    digits_model: Path, keys: dict[str, Path], tmp_path: Path, cli: Cli
) -> None:
    out = tmp_path / "dist"
    code, _, err = cli(
        *build_args(
            digits_model,
            keys,
            out,
            "--hw",
            "raspberry-pi-4",
            "--allow-pickle",
            "--validation",
            digits_model.parent / "val.npz",
            "--no-monitoring",
        )
    )
    assert code == 0, err
    meta = read_info(out / BUNDLE).metadata
    assert (meta["format_version"], meta["monitoring"]) == (2, None)
    code, shown, _ = cli("inspect", out / BUNDLE)
    assert "monitoring  none" in shown


def test_without_sample_data_the_build_records_none_and_says_so(
    digits_model: Path, keys: dict[str, Path], tmp_path: Path, cli: Cli
) -> None:
    out = tmp_path / "dist"
    code, _, err = cli(
        *build_args(digits_model, keys, out, "--hw", "raspberry-pi-4", "--allow-pickle", "--json")
    )
    assert code == 0, err
    assert read_info(out / BUNDLE).metadata["monitoring"] is None
    report = json.loads((out / "demo-1.0.0.build-report.json").read_text())
    assert any("no monitoring reference" in note for note in report["notes"])


@pytest.mark.parametrize(
    ("option", "words"),
    [
        ("shout=1", "unknown monitoring threshold 'shout'"),
        ("drift_psi=high", "is not KEY=NUMBER"),
        ("drift_psi", "is not KEY=NUMBER"),
        ("drift_psi=-0.2", "must be a positive number"),
        ("anomaly_rate=nan", "must be a positive number"),
        ("window=1.5", "must be a positive whole number"),
    ],
)
def test_a_bad_monitor_threshold_is_a_usage_error_and_writes_nothing(
    option: str, words: str, digits_model: Path, keys: dict[str, Path], tmp_path: Path, cli: Cli
) -> None:
    out = tmp_path / "dist"
    code, _, err = cli(
        *build_args(
            digits_model,
            keys,
            out,
            "--hw",
            "raspberry-pi-4",
            "--allow-pickle",
            "--monitor-threshold",
            option,
        )
    )
    assert code == 2
    assert words in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert outdir_files(out) == []


@needs_torch
def test_token_ids_of_varying_lengths_get_an_ids_summary(tmp_path: Path) -> None:
    """The encoder's validation batches differ in sequence length: its token ids are one
    ``ids`` feature over every id value, its embedding a row norm."""
    import torch

    from tests.build.models import tiny_encoder, token_batches

    batches = token_batches()
    staged = api.build_variants(
        tiny_encoder(),
        hw="raspberry-pi-5",
        workdir=tmp_path,
        quantize="dynamic",
        example_inputs=(torch.from_numpy(batches[0]["ids"]),),
        input_names=["ids"],
        output_names=["embedding"],
        dynamic_axes={"ids": {0: "batch", 1: "sequence"}, "embedding": {0: "batch"}},
        validation=batches,
    )
    reference = staged.variants[0].monitoring
    assert reference is not None, staged.variants[0].report.notes
    assert monitoring.check_reference(reference) == reference
    ids = reference["inputs"]["ids"]
    assert (ids["kind"], ids["features"]) == ("ids", 1)
    assert ids["max"] == [float(max(b["ids"].max() for b in batches))]
    assert reference["rows"] == sum(b["ids"].size for b in batches)  # id values counted
    assert reference["outputs"]["embedding"]["kind"] == "norm"
