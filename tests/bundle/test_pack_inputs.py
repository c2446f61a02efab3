"""What pack and build refuse to take in: hard links (their other name may be any file)
and external data that every device would refuse anyway."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest

from edgepack.errors import InvalidInputError
from tests.bundle.conftest import Keys, pack_model, write_linear_model


def _secret(tmp_path: Path) -> Path:
    secret = tmp_path / "outside" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(b"not for the bundle" * 100)
    return secret


def test_pack_refuses_a_hard_link_in_the_model_folder(
    model_dir: Path, tmp_path: Path, keys: Keys
) -> None:
    os.link(_secret(tmp_path), model_dir / "notes.bin")
    with pytest.raises(InvalidInputError, match="hard link"):
        pack_model(model_dir, tmp_path / "out", keys)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_pack_refuses_external_data_every_device_would_refuse(
    model_dir: Path, tmp_path: Path, keys: Keys
) -> None:
    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = str(model_dir / "model.onnx.data")  # absolute
    onnx.save(model, str(model_dir / "model.onnx"))
    with pytest.raises(InvalidInputError, match="absolute"):
        pack_model(model_dir, tmp_path / "out", keys)


def test_build_refuses_hard_linked_external_data(tmp_path: Path) -> None:
    from edgepack.build.convert import convert

    src = tmp_path / "src"
    write_linear_model(src)
    data = src / "model.onnx.data"
    secret = tmp_path / "secret.data"
    data.rename(secret)
    os.link(secret, data)  # the model folder's weights are another name of an outside file
    with pytest.raises(InvalidInputError, match="hard link"):
        convert(src / "model.onnx", tmp_path / "out")
