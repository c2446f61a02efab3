"""The three producer signers: local key (default), X.509 certificate chain, sigstore keyless."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgepack.bundle import verify
from edgepack.cli import main
from edgepack.errors import InvalidInputError, KeyFileError, TransportError, VerificationError
from edgepack.keys import generate_signing_key, private_pem, public_pem, write_private_file
from edgepack.signing import TrustPolicy, load_trust_policy, open_signer
from tests.bundle.conftest import Keys, pack_model, write_linear_model


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    signing: bool = True,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=signing and not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=not signing and not ca,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    return builder.sign(issuer_key, hashes.SHA256())


class PKI:
    """A CA and a code-signing leaf certificate, written as PEM files."""

    def __init__(self, root: Path, name: str = "ca", *, signing: bool = True) -> None:
        root.mkdir(parents=True, exist_ok=True)
        ca_key, leaf_key = generate_signing_key(), generate_signing_key()
        ca = _certificate(f"{name} root", ca_key, f"{name} root", ca_key, ca=True)
        leaf = _certificate("ml-team", leaf_key, f"{name} root", ca_key, ca=False, signing=signing)
        self.ca = root / f"{name}.pem"
        self.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        self.leaf = root / f"{name}-leaf.pem"
        self.leaf.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        self.key = root / f"{name}-leaf.key"
        write_private_file(self.key, private_pem(leaf_key, None))


def test_certificate_chain_signature_verifies_against_its_ca(
    model_dir: Path, tmp_path: Path, keys: Keys
) -> None:
    pki = PKI(tmp_path / "pki")
    signer = open_signer(pki.key, certificate=pki.leaf, chain=[pki.ca])
    result = pack_model(model_dir, tmp_path / "out", keys, signer=signer)
    policy = TrustPolicy(certificate_chains=((pki.ca,),), source="ca policy")
    report = verify(result.path, policy, keys.recipient)
    assert report.decrypted and report.signer == "chain:ca.pem"
    other = PKI(tmp_path / "other", "other")
    with pytest.raises(VerificationError, match="trust policy"):
        verify(result.path, TrustPolicy(certificate_chains=((other.ca,),)))
    with pytest.raises(VerificationError):  # a key policy does not accept a certificate signature
        verify(result.path, keys.policy)


def test_certificate_without_signing_usage_is_refused(
    model_dir: Path, tmp_path: Path, keys: Keys
) -> None:
    pki = PKI(tmp_path / "pki", signing=False)
    result = pack_model(
        model_dir,
        tmp_path / "out",
        keys,
        signer=open_signer(pki.key, certificate=pki.leaf, chain=[pki.ca]),
    )
    with pytest.raises(VerificationError):
        verify(result.path, TrustPolicy(certificate_chains=((pki.ca,),)))


def test_certificate_of_another_key_is_refused(tmp_path: Path) -> None:
    pki = PKI(tmp_path / "pki")
    stranger = tmp_path / "stranger.key"
    write_private_file(stranger, private_pem(generate_signing_key(), None))
    with pytest.raises(KeyFileError, match="does not belong"):
        open_signer(stranger, certificate=pki.leaf, chain=[pki.ca])


def test_policy_file_and_cli_with_a_certificate_chain(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    pki = PKI(tmp_path / "pki")
    producer = generate_signing_key()
    (tmp_path / "producer.pub").write_bytes(public_pem(producer.public_key()))
    (tmp_path / "device.pub").write_bytes(public_pem(keys.recipient.public_key()))
    (tmp_path / "policy.toml").write_text(
        'version = 1\n[[keys]]\npath = "producer.pub"\n[[certificates]]\nchain = ["pki/ca.pem"]\n'
    )
    write_linear_model(tmp_path / "model")
    code = main(
        [
            "pack",
            "model",
            "--name",
            "linear",
            "--version",
            "2.0",
            "--recipient",
            "device.pub",
            "--sign-key",
            str(pki.key),
            "--sign-cert",
            str(pki.leaf),
            "--sign-chain",
            str(pki.ca),
            "-o",
            "out",
        ]
    )
    assert code == 0
    policy = load_trust_policy(tmp_path / "policy.toml")
    assert len(policy.keys) == 1 and policy.certificate_chains == ((tmp_path / "pki" / "ca.pem",),)
    capsys.readouterr()
    assert main(["verify", "out/linear-2.0-any.epk", "--trust", "policy.toml", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["signer"] == "chain:ca.pem"


def test_bad_policies_are_clear(tmp_path: Path) -> None:
    (tmp_path / "empty.toml").write_text("version = 1\n")
    with pytest.raises(InvalidInputError, match="accepts nobody"):
        load_trust_policy(tmp_path / "empty.toml")
    (tmp_path / "odd.toml").write_text("version = 1\nfriends = []\n")
    with pytest.raises(InvalidInputError, match="unknown fields"):
        load_trust_policy(tmp_path / "odd.toml")
    (tmp_path / "junk.toml").write_bytes(b"\x00\x01 not toml")
    with pytest.raises(InvalidInputError, match="neither a public key nor a TOML"):
        load_trust_policy(tmp_path / "junk.toml")


def test_signer_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="no signer"):
        open_signer(None)
    with pytest.raises(InvalidInputError, match="without a key file"):
        open_signer(tmp_path / "k.key", sigstore=True)
    with pytest.raises(InvalidInputError, match="needs --sign-cert"):
        open_signer(tmp_path / "k.key", chain=[tmp_path / "ca.pem"])


def test_sigstore_keyless_offline_is_a_clear_transport_error() -> None:
    """Stand-in: sigstore's public services are unreachable here, so keyless signing is
    exercised only up to its first network call, which must fail as a TransportError."""
    signer = open_signer(None, sigstore=True, identity_token="eyJhbGciOiJub25lIn0.e30.")
    with pytest.raises(TransportError, match="sigstore keyless signing failed"):
        signer.sign_manifest("linear", {"model.onnx": "00" * 32})
