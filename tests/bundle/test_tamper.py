"""Every region of a bundle is protected: a change anywhere is one clear error and nothing is kept.

Each test aims at one defence (container checksum, metadata schema, STREAM
nonces, HPKE binding, producer signature, manifest digests) and would pass a
tampered bundle if that defence were removed.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from edgepack.bundle import PackResult, read_info, unpack, verify
from edgepack.bundle.metadata import Limits
from edgepack.crypto import StreamOpener, StreamSealer
from edgepack.errors import BundleFormatError, DecryptionError, EdgepackError, VerificationError
from edgepack.keys import generate_signing_key
from edgepack.signing import ProducerKeySigner, TrustPolicy
from tests.bundle import surgery
from tests.bundle.conftest import Keys, pack_model


def _rejects(path: Path, keys: Keys, tmp_path: Path, error: type[EdgepackError]) -> EdgepackError:
    """Unpacking ``path`` fails with ``error`` and leaves no staging directory behind."""
    dest = tmp_path / "staging"
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(error) as caught:
        unpack(path, dest, recipient_key=keys.recipient, policy=keys.policy)
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert "\n" not in caught.value.diagnostics()
    return caught.value


def test_flipped_bit_in_each_container_header(
    bundle: PackResult, keys: Keys, tmp_path: Path
) -> None:
    info = read_info(bundle.path)
    header_offsets = [0, info.payload_offset - 512]
    for offset in header_offsets:
        for field in (0, 124, 156, 257):  # name, size, type, magic
            _rejects(surgery.flip(bundle.path, offset + field), keys, tmp_path, BundleFormatError)


def test_flipped_bit_in_each_payload_segment(
    bundle: PackResult, keys: Keys, tmp_path: Path
) -> None:
    segments = surgery.payload_segments(bundle.path)
    assert len(segments) >= 4
    for offset, length in segments:
        for where in (0, length // 2, length - 1):  # start, middle, tag
            _rejects(surgery.flip(bundle.path, offset + where), keys, tmp_path, DecryptionError)


def _swap_segments(path: Path, i: int, j: int) -> Path:
    segments = surgery.payload_segments(path)
    data = bytearray(path.read_bytes())
    (oi, li), (oj, lj) = segments[i], segments[j]
    assert li == lj
    a, b = bytes(data[oi : oi + li]), bytes(data[oj : oj + lj])
    data[oi : oi + li], data[oj : oj + lj] = b, a
    out = path.with_name("swapped-" + path.name)
    out.write_bytes(bytes(data))
    return out


def test_swapped_and_repeated_segments(bundle: PackResult, keys: Keys, tmp_path: Path) -> None:
    _rejects(_swap_segments(bundle.path, 0, 1), keys, tmp_path, DecryptionError)
    segments = surgery.payload_segments(bundle.path)
    data = bytearray(bundle.path.read_bytes())
    (o0, l0), (o1, _l1) = segments[0], segments[1]
    data[o1 : o1 + l0] = data[o0 : o0 + l0]
    repeated = tmp_path / "repeated.epk"
    repeated.write_bytes(bytes(data))
    _rejects(repeated, keys, tmp_path, DecryptionError)


def test_segments_spliced_from_another_bundle(
    bundle: PackResult, model_dir: Path, keys: Keys, tmp_path: Path
) -> None:
    other = pack_model(model_dir, tmp_path / "other", keys)
    ours, theirs = surgery.payload_segments(bundle.path), surgery.payload_segments(other.path)
    data = bytearray(bundle.path.read_bytes())
    source = other.path.read_bytes()
    (o, length), (p, _) = ours[2], theirs[2]
    data[o : o + length] = source[p : p + length]
    spliced = tmp_path / "spliced.epk"
    spliced.write_bytes(bytes(data))
    _rejects(spliced, keys, tmp_path, DecryptionError)


def test_truncation_is_detected_at_every_level(
    bundle: PackResult, keys: Keys, tmp_path: Path
) -> None:
    data = bundle.path.read_bytes()
    for cut in (100, 600, len(data) // 2, len(data) - 1024, len(data) - 1):
        short = tmp_path / f"short-{cut}.epk"
        short.write_bytes(data[:cut])
        _rejects(short, keys, tmp_path, BundleFormatError)
    # A payload that lost its last segment, in a well-formed container: sizes disagree with the manifest.
    members = dict(surgery.split(bundle.path))
    last = surgery.payload_segments(bundle.path)[-1][1]
    dropped = surgery.replace(bundle.path, "payload.enc", members["payload.enc"][:-last])
    _rejects(dropped, keys, tmp_path, BundleFormatError)


def test_stream_refuses_a_stream_that_ends_early_or_late() -> None:
    key, prefix = b"k" * 32, b"p" * 7
    sealer = StreamSealer(key, prefix)
    out = bytearray(64)
    first = bytes(sealer.seal(b"a" * 16, out, last=False))
    second = bytes(sealer.seal(b"b" * 16, out, last=True))
    plain = bytearray(32)
    with pytest.raises(DecryptionError):  # truncated: the first segment was not sealed as the last
        StreamOpener(key, prefix).open(first, plain, last=True)
    opener = StreamOpener(key, prefix)
    opener.open(first, plain, last=False)
    with pytest.raises(DecryptionError):  # extended: the final segment claims not to be final
        opener.open(second, plain, last=False)


def test_flipped_wrapped_key_and_nonce_prefix(
    bundle: PackResult, keys: Keys, tmp_path: Path
) -> None:
    def flip_sealed(doc: dict[str, Any]) -> None:
        for entry in doc["recipients"]:
            raw = bytearray(base64.b64decode(entry["sealed"]))
            raw[-5] ^= 1
            entry["sealed"] = base64.b64encode(bytes(raw)).decode()

    _rejects(
        surgery.edit_json(bundle.path, "meta/encryption.json", flip_sealed),
        keys,
        tmp_path,
        DecryptionError,
    )

    def flip_prefix(doc: dict[str, Any]) -> None:
        doc["nonce_prefix"] = "%014x" % (int(doc["nonce_prefix"], 16) ^ 1)

    _rejects(
        surgery.edit_json(bundle.path, "meta/encryption.json", flip_prefix),
        keys,
        tmp_path,
        DecryptionError,
    )


def test_wrapped_key_moved_to_another_identity_fails(
    bundle: PackResult, model_dir: Path, keys: Keys, tmp_path: Path
) -> None:
    """The HPKE info binds the wrap to name/version/profile: a v2 header on v1's payload is refused."""
    other = pack_model(model_dir, tmp_path / "v2", keys, version="2.0.0")
    header = dict(surgery.split(other.path))["meta/encryption.json"]
    moved = surgery.replace(bundle.path, "meta/encryption.json", header)
    _rejects(moved, keys, tmp_path, DecryptionError)


def test_flipped_signature(bundle: PackResult, keys: Keys, tmp_path: Path) -> None:
    def flip_sig(doc: dict[str, Any]) -> None:
        sig = bytearray(base64.b64decode(doc["dsseEnvelope"]["signatures"][0]["sig"]))
        sig[10] ^= 1
        doc["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()

    _rejects(
        surgery.edit_json(bundle.path, "meta/signature.sigstore.json", flip_sig),
        keys,
        tmp_path,
        VerificationError,
    )
    garbage = surgery.replace(bundle.path, "meta/signature.sigstore.json", b"{not json")
    _rejects(garbage, keys, tmp_path, VerificationError)


def test_signature_by_an_untrusted_key(model_dir: Path, keys: Keys, tmp_path: Path) -> None:
    intruder = pack_model(
        model_dir, tmp_path / "evil", keys, signer=ProducerKeySigner(generate_signing_key())
    )
    error = _rejects(intruder.path, keys, tmp_path, VerificationError)
    assert "trust policy" in error.diagnostics()


def test_metadata_edited_after_signing(bundle: PackResult, keys: Keys, tmp_path: Path) -> None:
    def relabel(doc: dict[str, Any]) -> None:
        doc["health"] = None
        doc["created_by"] = "someone else"

    error = _rejects(
        surgery.edit_json(bundle.path, "meta/bundle.json", relabel),
        keys,
        tmp_path,
        VerificationError,
    )
    assert "edited after signing" in error.diagnostics()


def test_signature_transplanted_from_another_release(
    bundle: PackResult, model_dir: Path, keys: Keys, tmp_path: Path
) -> None:
    """A genuine signature of v2 does not vouch for v1's metadata."""
    other = pack_model(model_dir, tmp_path / "v2", keys, version="2.0.0")
    signature = dict(surgery.split(other.path))["meta/signature.sigstore.json"]
    _rejects(
        surgery.replace(bundle.path, "meta/signature.sigstore.json", signature),
        keys,
        tmp_path,
        VerificationError,
    )


def test_payload_swapped_with_matching_manifest_fails_signature(
    bundle: PackResult, model_dir: Path, keys: Keys, tmp_path: Path
) -> None:
    """An attacker who can encrypt to the device still cannot change what the model is."""
    (model_dir / "model.onnx.data").write_bytes(
        b"\x00" * (model_dir / "model.onnx.data").stat().st_size
    )
    evil = pack_model(
        model_dir, tmp_path / "evil", keys, signer=ProducerKeySigner(generate_signing_key())
    )
    members = dict(surgery.split(evil.path))
    members["meta/signature.sigstore.json"] = dict(surgery.split(bundle.path))[
        "meta/signature.sigstore.json"
    ]
    forged = tmp_path / "forged.epk"
    forged.write_bytes(surgery.join(list(members.items())))
    _rejects(forged, keys, tmp_path, VerificationError)


def test_verify_without_key_checks_the_signature_only(bundle: PackResult, keys: Keys) -> None:
    report = verify(bundle.path, keys.policy)
    assert not report.decrypted
    with pytest.raises(VerificationError):
        verify(bundle.path, TrustPolicy.from_keys([generate_signing_key().public_key()]))


def test_unknown_format_version_is_refused_clearly(
    bundle: PackResult, keys: Keys, tmp_path: Path
) -> None:
    def future(doc: dict[str, Any]) -> None:
        doc["format_version"] = 99

    error = _rejects(
        surgery.edit_json(bundle.path, "meta/bundle.json", future),
        keys,
        tmp_path,
        BundleFormatError,
    )
    assert "version 99" in error.diagnostics()


def test_oversize_metadata_is_refused_before_parsing(bundle: PackResult) -> None:
    with pytest.raises(BundleFormatError, match="oversize"):
        read_info(bundle.path, Limits(max_bundle_json=100))
    with pytest.raises(BundleFormatError, match="too many files"):
        read_info(bundle.path, Limits(max_files=1))
    json.dumps(read_info(bundle.path).summary())
