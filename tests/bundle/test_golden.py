"""Bundles written by format v1 (the committed golden file) stay readable by every later edgepack."""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

from edgepack.bundle import read_info, unpack
from edgepack.signing import load_trust_policy

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "v1"


def _recipient() -> x25519.X25519PrivateKey:
    key = serialization.load_pem_private_key((GOLDEN / "recipient.key.pem").read_bytes(), None)
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
