"""Packing and unpacking a real model: content, determinism, recipients, limits on reading."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgepack.bundle import read_info, unpack, verify
from edgepack.errors import InvalidInputError, VerificationError
from tests.bundle.conftest import Keys, pack_model


def _members(path: Path) -> dict[str, bytes]:
    """Each container member's bytes, read with the real tar reader (tools can look inside)."""
    import tarfile

    with tarfile.open(path) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers()}  # type: ignore[union-attr]


def test_unpacked_model_runs_like_the_original(model_dir: Path, tmp_path: Path, keys: Keys) -> None:
    result = pack_model(model_dir, tmp_path / "out", keys)
    dest = tmp_path / "unpacked"
    unpack(result.path, dest, recipient_key=keys.recipient, policy=keys.policy)
    for source in model_dir.iterdir():
        assert (dest / source.name).read_bytes() == source.read_bytes()
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    original = ort.InferenceSession(str(model_dir / "model.onnx")).run(None, {"x": x})[0]
    restored = ort.InferenceSession(str(dest / "model.onnx")).run(None, {"x": x})[0]
    np.testing.assert_array_equal(original, restored)
    assert all(not os.stat(p).st_mode & 0o222 for p in dest.rglob("*") if p.is_file())


def test_every_recipient_can_open_and_a_stranger_cannot(
    bundle_path_and_keys: tuple[Path, Keys], tmp_path: Path
) -> None:
    path, keys = bundle_path_and_keys
    for key in (keys.recipient, keys.other_recipient):
        assert verify(path, keys.policy, key).decrypted
    with pytest.raises(VerificationError, match="not encrypted for this recipient"):
        unpack(path, tmp_path / "x", recipient_key=keys.stranger, policy=keys.policy)
    assert not (tmp_path / "x").exists()


@pytest.fixture
def bundle_path_and_keys(model_dir: Path, tmp_path: Path, keys: Keys) -> tuple[Path, Keys]:
    return pack_model(model_dir, tmp_path / "out", keys).path, keys


def test_metadata_is_deterministic_and_only_crypto_bytes_vary(
    model_dir: Path, tmp_path: Path, keys: Keys
) -> None:
    first = _members(pack_model(model_dir, tmp_path / "a", keys).path)
    second = _members(pack_model(model_dir, tmp_path / "b", keys).path)
    assert list(first) == [
        "meta/encryption.json",
        "payload.enc",
        "meta/bundle.json",
        "meta/signature.sigstore.json",
    ]
    assert first["meta/bundle.json"] == second["meta/bundle.json"]
    # Deterministic ECDSA (RFC 6979): the same manifest signs to the same bytes.
    assert first["meta/signature.sigstore.json"] == second["meta/signature.sigstore.json"]
    assert len(first["payload.enc"]) == len(second["payload.enc"])
    assert first["payload.enc"] != second["payload.enc"]  # fresh content key and nonces
    enc_a, enc_b = (
        json.loads(first["meta/encryption.json"]),
        json.loads(second["meta/encryption.json"]),
    )
    assert [r["key_id"] for r in enc_a["recipients"]] == [r["key_id"] for r in enc_b["recipients"]]
    assert enc_a["nonce_prefix"] != enc_b["nonce_prefix"]


def test_recipient_order_does_not_change_the_metadata(
    model_dir: Path, tmp_path: Path, keys: Keys
) -> None:
    forward = [keys.recipient.public_key(), keys.other_recipient.public_key()]
    a = _members(pack_model(model_dir, tmp_path / "a", keys, recipients=forward).path)
    b = _members(pack_model(model_dir, tmp_path / "b", keys, recipients=forward[::-1]).path)

    def ids(members: dict[str, bytes]) -> list[str]:
        return [r["key_id"] for r in json.loads(members["meta/encryption.json"])["recipients"]]

    assert ids(a) == ids(b)


def test_metadata_is_plain_text_without_secrets(bundle_path_and_keys: tuple[Path, Keys]) -> None:
    path, _ = bundle_path_and_keys
    info = read_info(path)
    meta = info.metadata
    assert meta["name"] == "linear" and meta["version"] == "1.0.0"
    assert [f["path"] for f in meta["payload"]["files"]] == ["model.onnx", "model.onnx.data"]
    text = _members(path)["meta/bundle.json"].decode()
    assert "PRIVATE" not in text and str(path.parent.parent) not in text


def test_empty_and_exact_multiple_payloads(tmp_path: Path, keys: Keys) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.onnx").write_bytes(b"\x00" * 8192)  # exactly two segments of 4096
    (model / "zero.bin").write_bytes(b"")
    result = pack_model(model, tmp_path / "out", keys)
    dest = tmp_path / "u"
    unpack(result.path, dest, recipient_key=keys.recipient, policy=keys.policy)
    assert (dest / "zero.bin").read_bytes() == b""
    assert (dest / "model.onnx").read_bytes() == b"\x00" * 8192


def test_packing_refuses_links_and_leaves_nothing(
    model_dir: Path, tmp_path: Path, keys: Keys
) -> None:
    (model_dir / "escape").symlink_to("/etc/passwd")
    out = tmp_path / "out"
    with pytest.raises(InvalidInputError, match="not a regular file"):
        pack_model(model_dir, out, keys)
    assert not out.exists() or list(out.iterdir()) == []


def test_unpack_refuses_an_existing_destination(
    bundle_path_and_keys: tuple[Path, Keys], tmp_path: Path
) -> None:
    path, keys = bundle_path_and_keys
    dest = tmp_path / "exists"
    dest.mkdir()
    (dest / "keep").write_text("mine")
    with pytest.raises(InvalidInputError, match="already exists"):
        unpack(path, dest, recipient_key=keys.recipient, policy=keys.policy)
    assert (dest / "keep").read_text() == "mine"
