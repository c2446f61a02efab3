"""The producer signature checked in a child process gives the in-process verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from device_agent.sigcheck import _policy_from_json, _policy_to_json, verify_signature_isolated
from edgepack import bundle, keys
from edgepack.errors import VerificationError
from edgepack.signing import SigstoreIdentity, TrustPolicy, load_trust_policy, verify_signature
from tests.agent._support import World


def test_a_good_signature_verifies_as_in_process(world: World) -> None:
    info = bundle.read_info(world.make_bundle("1.0.0", 2.0))
    policy = load_trust_policy(world.producer_pub)
    isolated = verify_signature_isolated(info.signature, policy)
    assert isolated == verify_signature(info.signature, policy)
    assert isolated.model_name == "digits" and "model.onnx" in isolated.digests


def test_an_unknown_producer_is_refused_with_the_same_message(world: World, tmp_path: Path) -> None:
    info = bundle.read_info(world.make_bundle("1.0.0", 2.0))
    other = keys.write_keypair(tmp_path / "other", keys.generate_signing_key()).public
    policy = load_trust_policy(other)
    with pytest.raises(VerificationError) as in_process:
        verify_signature(info.signature, policy)
    with pytest.raises(VerificationError) as isolated:
        verify_signature_isolated(info.signature, policy)
    assert isolated.value.diagnostics() == in_process.value.diagnostics()
    assert "trust policy" in isolated.value.diagnostics()


def test_a_garbled_signature_is_a_verification_error(world: World) -> None:
    info = bundle.read_info(world.make_bundle("1.0.0", 2.0))
    policy = load_trust_policy(world.producer_pub)
    with pytest.raises(VerificationError, match="malformed"):
        verify_signature_isolated(info.signature[: len(info.signature) // 2], policy)


def test_every_field_of_the_policy_crosses_to_the_child(tmp_path: Path) -> None:
    signing = [keys.generate_signing_key().public_key() for _ in range(2)]
    policy = TrustPolicy(
        keys=tuple(signing),
        certificate_chains=((tmp_path / "leaf.pem", tmp_path / "ca.pem"),),
        sigstore=(SigstoreIdentity("ml@example.com", "https://issuer.example"),),
        source=str(tmp_path / "policy.toml"),
    )
    again = _policy_from_json(json.loads(json.dumps(_policy_to_json(policy))))
    assert again == policy
    assert again.key_ids == policy.key_ids
