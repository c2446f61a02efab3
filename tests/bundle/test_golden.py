"""Bundles written by format v1 and v2 (the committed golden files) stay readable by every
later edgepack."""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

from edgepack.bundle import check_signature, read_info, unpack
from edgepack.monitoring import check_reference
from edgepack.signing import load_trust_policy

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "v1"
GOLDEN_V2 = GOLDEN.parent / "v2"


def _recipient(golden: Path = GOLDEN) -> x25519.X25519PrivateKey:
    key = serialization.load_pem_private_key((golden / "recipient.key.pem").read_bytes(), None)
    assert isinstance(key, x25519.X25519PrivateKey)
    return key


def test_golden_v1_bundle_reads_verifies_and_unpacks(tmp_path: Path) -> None:
    bundle = GOLDEN / "golden-1.0.0-generic-x86_64.epk"
    info = read_info(bundle)
    assert (info.name, info.version, info.profile, info.architectures) == (
        "golden",
        "1.0.0",
        "generic-x86_64",
        ("x86_64",),
    )
    assert info.metadata["format_version"] == 1
    assert "monitoring" not in info.metadata
    assert info.metadata["health"]["file"] == "health/golden.npz"
    dest = tmp_path / "out"
    unpack(
        bundle, dest, recipient_key=_recipient(), policy=load_trust_policy(GOLDEN / "producer.pub")
    )
    sources = [p for p in (GOLDEN / "source").rglob("*") if p.is_file()]
    assert len(sources) == 3
    for source in sources:
        rel = source.relative_to(GOLDEN / "source")
        assert (
            hashlib.sha256((dest / rel).read_bytes()).digest()
            == hashlib.sha256(source.read_bytes()).digest()
        )


def test_golden_v2_bundle_reads_verifies_and_unpacks_with_its_reference(tmp_path: Path) -> None:
    bundle = GOLDEN_V2 / "golden-1.0.0-generic-x86_64.epk"
    info = read_info(bundle)
    assert info.metadata["format_version"] == 2
    reference = info.metadata["monitoring"]
    assert check_reference(reference) == reference
    assert reference["inputs"]["x"]["kind"] == "columns"
    assert reference["inputs"]["x"]["features"] == 16
    assert reference["outputs"]["y"]["kind"] == "norm"
    assert reference["thresholds"]["drift_psi"] == 0.3
    policy = load_trust_policy(GOLDEN_V2 / "producer.pub")
    check_signature(info, policy)  # the reference is signed metadata
    dest = tmp_path / "out"
    unpack(bundle, dest, recipient_key=_recipient(GOLDEN_V2), policy=policy)
    sources = [p for p in (GOLDEN_V2 / "source").rglob("*") if p.is_file()]
    assert len(sources) == 3
    for source in sources:
        rel = source.relative_to(GOLDEN_V2 / "source")
        assert (dest / rel).read_bytes() == source.read_bytes()
