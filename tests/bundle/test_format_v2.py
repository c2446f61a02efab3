"""Format v2: the signed ``monitoring`` reference, checked by the reader without numpy."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgepack import monitoring
from edgepack.bundle import _monitoring, read_info
from edgepack.bundle.metadata import FORMAT_VERSION, SUPPORTED_VERSIONS
from edgepack.errors import BundleFormatError, InvalidInputError
from tests.bundle import surgery
from tests.bundle.conftest import Keys, pack_model

ROOT = Path(__file__).resolve().parents[2]
META = "meta/bundle.json"


def _reference() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((80, 64)).astype(np.float32)
    logits = rng.standard_normal((80, 10))
    probs = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32)
    return monitoring.build_reference(
        {"x": rows, "ids": rng.integers(0, 500, (80, 12))},
        {"probs": probs, "label": probs.argmax(axis=1).astype(np.int64), "emb": rows[:, :8]},
    )


def test_the_reader_bounds_are_the_producers() -> None:
    assert _monitoring.REFERENCE_VERSION == monitoring.FORMAT_VERSION
    assert _monitoring.BINS == monitoring.BINS
    assert _monitoring.MAX_FEATURES == monitoring.MAX_FEATURES
    assert _monitoring.MAX_CLASSES == monitoring.MAX_CLASSES
    assert _monitoring.MAX_REFERENCE_BYTES == monitoring.MAX_REFERENCE_BYTES
    assert set(monitoring.DEFAULT_THRESHOLDS) == _monitoring.THRESHOLD_KEYS
    assert (FORMAT_VERSION, SUPPORTED_VERSIONS) == (2, (1, 2))


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


def _drop(path: tuple[Any, ...]) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return change


def _many_features(doc: dict[str, Any]) -> None:
    block = doc["inputs"]["x"]
    for i in range(9):
        doc["inputs"][f"x{i}"] = copy.deepcopy(block)


MUTATIONS: dict[str, Callable[[dict[str, Any]], None]] = {
    "unchanged": lambda doc: None,
    "reference version": _set(("format_version",), 2),
    "bins": _set(("bins",), 12),
    "rows zero": _set(("rows",), 0),
    "rows bool": _set(("rows",), True),
    "unknown threshold": _set(("thresholds", "shout"), 1.0),
    "threshold text": _set(("thresholds", "drift_psi"), "high"),
    "inputs list": _set(("inputs",), []),
    "input kind": _set(("inputs", "x", "kind"), "pixels"),
    "features zero": _set(("inputs", "x", "features"), 0),
    "stride text": _set(("inputs", "x", "stride"), "1"),
    "edges short": _set(("inputs", "x", "edges", 0), [0.0] * 3),
    "probs rows": _set(("inputs", "x", "probs"), [[0.1] * 10]),
    "mean missing": _drop(("inputs", "x", "mean")),
    "max bool": _set(("inputs", "x", "max", 0), False),
    "over 512 features": _many_features,
    "over the byte bound": _set(("outputs", "probs", "pad"), "x" * (170 * 1024)),
    "output kind": _set(("outputs", "probs", "kind"), "logits"),
    "classes empty": _set(("outputs", "label", "classes"), []),
    "classes text": _set(("outputs", "label", "classes", 0), "cat"),
    "class probs short": _set(("outputs", "label", "probs"), [1.0]),
    "norm edges": _set(("outputs", "emb", "edges"), [1.0]),
    "norm mean text": _set(("outputs", "emb", "mean"), "big"),
    "not an object": lambda doc: doc.clear(),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_the_reader_and_the_producer_agree_on_every_document(name: str) -> None:
    """The numpy-free check refuses exactly what monitoring.check_reference refuses."""
    doc = _reference()
    MUTATIONS[name](doc)
    try:
        monitoring.check_reference(copy.deepcopy(doc))
        producer_ok = True
    except InvalidInputError:
        producer_ok = False
    try:
        _monitoring.check_monitoring(copy.deepcopy(doc))
        reader_ok = True
    except BundleFormatError as exc:
        assert "\n" not in exc.diagnostics()
        reader_ok = False
    assert reader_ok == producer_ok
    assert reader_ok == (name == "unchanged")


def test_pack_writes_v2_with_or_without_a_reference(
    model_dir: Path, tmp_path: Path, keys: Keys
) -> None:
    reference = _reference()
    with_ref = pack_model(model_dir, tmp_path / "a", keys, monitoring=reference)
    without = pack_model(model_dir, tmp_path / "b", keys)
    assert read_info(with_ref.path).metadata["format_version"] == 2
    assert read_info(with_ref.path).metadata["monitoring"] == reference
    assert read_info(without.path).metadata["format_version"] == 2
    assert read_info(without.path).metadata["monitoring"] is None


def test_pack_refuses_a_malformed_reference_and_writes_nothing(
    model_dir: Path, tmp_path: Path, keys: Keys
) -> None:
    bad = _reference()
    bad["bins"] = 3
    out = tmp_path / "out"
    with pytest.raises(InvalidInputError, match="bins"):
        pack_model(model_dir, out, keys, monitoring=bad)
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (_set(("monitoring", "inputs", "x", "kind"), "pixels"), "no known kind"),
        (_set(("monitoring", "inputs", "x", "edges"), []), "edges"),
        (_set(("monitoring",), "yes"), "monitoring"),
        (_set(("monitoring",), []), "monitoring"),
        (_drop(("monitoring",)), "missing field 'monitoring'"),
    ],
)
def test_a_v2_bundle_with_a_malformed_reference_is_refused(
    model_dir: Path,
    tmp_path: Path,
    keys: Keys,
    change: Callable[[dict[str, Any]], None],
    match: str,
) -> None:
    packed = pack_model(model_dir, tmp_path / "out", keys, monitoring=_reference())
    tampered = surgery.edit_json(packed.path, META, change)
    with pytest.raises(BundleFormatError, match=match) as caught:
        read_info(tampered)
    assert "\n" not in caught.value.diagnostics()


def test_a_v1_bundle_carrying_a_reference_is_refused(
    model_dir: Path, tmp_path: Path, keys: Keys
) -> None:
    packed = pack_model(model_dir, tmp_path / "out", keys, monitoring=_reference())

    def as_v1(doc: dict[str, Any]) -> None:
        doc["format_version"] = 1

    with pytest.raises(BundleFormatError, match="format 1 has no 'monitoring'"):
        read_info(surgery.edit_json(packed.path, META, as_v1))

    def plain_v1(doc: dict[str, Any]) -> None:
        doc["format_version"] = 1
        del doc["monitoring"]

    assert read_info(surgery.edit_json(packed.path, META, plain_v1)).metadata["format_version"] == 1


def test_reading_a_reference_loads_no_numpy(model_dir: Path, tmp_path: Path, keys: Keys) -> None:
    """The device agent's daemon reads bundles through this reader and must not load numpy."""
    packed = pack_model(model_dir, tmp_path / "out", keys, monitoring=_reference())
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from edgepack.bundle import read_info\n"
        f"info = read_info(Path({str(packed.path)!r}))\n"
        "assert info.metadata['monitoring']['inputs']['x']['features'] == 64\n"
        "print('numpy' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "False"
