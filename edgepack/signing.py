"""Producer signatures (OpenSSF model-signing) and device trust policies.

A bundle's signature is a sigstore bundle holding a DSSE envelope with an
in-toto statement, exactly as ``model_signing`` writes it, over a manifest of
the plaintext payload files plus ``meta/bundle.json``. We compute that manifest
ourselves while packing (so the payload is hashed once) and hand it to
model-signing's signers; verification uses model-signing's verifiers and then
compares the signed manifest with the one the reader computed.

Signers: a local EC P-256 key (offline default), an X.509 certificate chain,
or sigstore keyless (OIDC; needs the network). A trust policy lists what a
verifier accepts: public keys, certificate chains, sigstore identities.
"""

from __future__ import annotations

import base64
import hashlib
import json
import pathlib
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgepack.errors import InvalidInputError, KeyFileError, TransportError, VerificationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

_MAX_SIGNATURE = 4 * 1024 * 1024


class ProducerSigner(Protocol):
    """Anything that signs a manifest of ``{path: sha256 hex}`` for a model name."""

    def sign_manifest(self, model_name: str, digests: Mapping[str, str]) -> bytes:
        """Return the serialized sigstore bundle signing ``digests``."""
        ...

    def describe(self) -> str:
        """A short, human description of the signing identity."""
        ...


def _manifest(model_name: str, digests: Mapping[str, str]) -> Any:
    from model_signing import manifest
    from model_signing._hashing import hashing

    serialization_type = manifest._FileSerialization("sha256", allow_symlinks=False)
    items = [
        manifest.FileManifestItem(
            path=pathlib.PurePosixPath(path),
            digest=hashing.Digest("sha256", bytes.fromhex(hexdigest)),
        )
        for path, hexdigest in sorted(digests.items())
    ]
    return manifest.Manifest(model_name, items, serialization_type)


def _sign_with(signer: Any, model_name: str, digests: Mapping[str, str]) -> bytes:
    from model_signing._signing import signing

    payload = signing.Payload(_manifest(model_name, digests))
    signature = signer.sign(payload)
    return str(signature.bundle.to_json()).encode()


def _key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    pem = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(pem).hexdigest()


class _DeterministicKey:
    """An EC private key that signs with RFC 6979 deterministic ECDSA.

    model-signing asks the key object for ``sign(data, ECDSA(hash))``; this
    wrapper keeps its hash choice and makes the nonce deterministic, so the
    same manifest signed twice gives the same bytes (bundles are reproducible
    apart from their encryption) and no signature depends on the quality of
    the signing machine's random numbers.
    """

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key

    def sign(self, data: bytes, algorithm: ec.ECDSA) -> bytes:
        return self._key.sign(data, ec.ECDSA(algorithm.algorithm, deterministic_signing=True))

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()


class ProducerKeySigner:
    """Signs with a local EC P-256 key: the offline default."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        from model_signing._signing import sign_ec_key

        signer = sign_ec_key.Signer.__new__(sign_ec_key.Signer)
        # The library only loads keys from paths, and only needs sign() and public_key().
        signer._private_key = _DeterministicKey(private_key)  # type: ignore[assignment]
        self._signer = signer
        self._key_id = _key_id(private_key.public_key())

    def sign_manifest(self, model_name: str, digests: Mapping[str, str]) -> bytes:
        """Sign ``digests`` (path to sha256 hex) for ``model_name``."""
        return _sign_with(self._signer, model_name, digests)

    def describe(self) -> str:
        """The key's identifier (sha256 of its public PEM)."""
        return f"key:{self._key_id[:16]}"


class CertificateSigner:
    """Signs with a key whose certificate chains to a CA the devices trust."""

    def __init__(
        self,
        private_key_path: Path,
        certificate: Path,
        chain: Sequence[Path],
        passphrase_env: str | None = None,
    ) -> None:
        from model_signing._signing import sign_certificate

        from edgepack.keys import load_signing_private_key

        key = load_signing_private_key(private_key_path, passphrase_env)
        signer = sign_certificate.Signer.__new__(sign_certificate.Signer)
        signer._private_key = _DeterministicKey(key)  # type: ignore[assignment]
        try:
            signer._signing_certificate = x509.load_pem_x509_certificate(certificate.read_bytes())
            signer._trust_chain = x509.load_pem_x509_certificates(
                b"".join(p.read_bytes() for p in chain)
            )
        except (OSError, ValueError) as exc:
            raise KeyFileError(f"cannot read the signing certificate or chain: {exc}") from None
        if signer._signing_certificate.public_key() != key.public_key():
            raise KeyFileError(
                f"the certificate {certificate} does not belong to the key {private_key_path}",
                hint="pass the certificate issued for this key",
            )
        self._signer = signer
        self._subject = signer._signing_certificate.subject.rfc4514_string()

    def sign_manifest(self, model_name: str, digests: Mapping[str, str]) -> bytes:
        """Sign ``digests`` and embed the certificate chain."""
        return _sign_with(self._signer, model_name, digests)

    def describe(self) -> str:
        """The certificate's subject."""
        return f"certificate:{self._subject}"


class SigstoreSigner:
    """Sigstore keyless signing (OIDC identity, Fulcio certificate, Rekor log).

    Needs the network to reach sigstore's public services, which this project's
    tests cannot; it is exercised as far as it can be offline.
    """

    def __init__(self, identity_token: str | None = None, *, use_staging: bool = False) -> None:
        self._identity_token = identity_token
        self._use_staging = use_staging

    def sign_manifest(self, model_name: str, digests: Mapping[str, str]) -> bytes:
        """Sign through sigstore's services; a clear TransportError when offline."""
        try:
            from model_signing._signing import sign_sigstore

            signer = sign_sigstore.Signer(
                identity_token=self._identity_token,
                use_staging=self._use_staging,
                use_ambient_credentials=self._identity_token is None,
            )
            return _sign_with(signer, model_name, digests)
        except Exception as exc:
            raise TransportError(
                f"sigstore keyless signing failed: {type(exc).__name__}: {exc}",
                hint="keyless signing needs network access to sigstore; sign with a local key offline",
            ) from None

    def describe(self) -> str:
        """Keyless: the identity is known only once the OIDC flow ran."""
        return "sigstore-keyless"


# ----------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class SigstoreIdentity:
    """An accepted sigstore keyless identity: who, and which OIDC issuer vouched for it."""

    identity: str
    issuer: str


@dataclass(frozen=True)
class TrustPolicy:
    """What a verifier accepts as a producer: keys, certificate chains, sigstore identities."""

    keys: tuple[ec.EllipticCurvePublicKey, ...] = ()
    certificate_chains: tuple[tuple[Path, ...], ...] = ()
    sigstore: tuple[SigstoreIdentity, ...] = ()
    source: str = "<inline>"

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Identifiers of the accepted keys (sha256 of each public PEM), in order."""
        return tuple(_key_id(k) for k in self.keys)

    @staticmethod
    def from_keys(
        keys: Sequence[ec.EllipticCurvePublicKey], source: str = "<inline>"
    ) -> TrustPolicy:
        """A policy accepting exactly these producer public keys."""
        return TrustPolicy(keys=tuple(keys), source=source)


@dataclass(frozen=True)
class VerifiedSignature:
    """A signature that verified: who signed, and the manifest they signed."""

    signer: str
    model_name: str
    digests: dict[str, str]


def load_trust_policy(path: Path) -> TrustPolicy:
    """Load a trust policy: a TOML policy file, or one producer public key (``.pub``) for the simple case.

    Policy file::

        version = 1
        [[keys]]
        path = "producer.pub"          # relative to the policy file
        [[certificates]]
        chain = ["ca.pem"]
        [[sigstore]]
        identity = "ml-team@example.com"
        issuer = "https://accounts.example.com"
    """
    from edgepack.keys import load_signing_public_key

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"cannot read trust policy {path}: {exc.strerror}") from None
    if b"-----BEGIN PUBLIC KEY-----" in data:
        return TrustPolicy.from_keys([load_signing_public_key(path)], source=str(path))
    try:
        doc = tomllib.loads(data.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidInputError(
            f"{path} is neither a public key nor a TOML trust policy: {exc}",
            hint="see docs/bundle-format.md for the policy format",
        ) from None
    unknown = set(doc) - {"version", "keys", "certificates", "sigstore"}
    if unknown or doc.get("version", 1) != 1:
        raise InvalidInputError(f"trust policy {path}: unknown fields {sorted(unknown)} or version")
    base = path.parent
    keys: list[ec.EllipticCurvePublicKey] = []
    chains: list[tuple[Path, ...]] = []
    identities: list[SigstoreIdentity] = []
    try:
        for entry in doc.get("keys", []):
            keys.append(load_signing_public_key(base / entry["path"]))
        for entry in doc.get("certificates", []):
            chains.append(tuple(base / p for p in entry["chain"]))
        for entry in doc.get("sigstore", []):
            identities.append(SigstoreIdentity(str(entry["identity"]), str(entry["issuer"])))
    except (KeyError, TypeError) as exc:
        raise InvalidInputError(f"trust policy {path}: malformed entry ({exc})") from None
    if not (keys or chains or identities):
        raise InvalidInputError(f"trust policy {path} accepts nobody", hint="list at least one key")
    return TrustPolicy(
        keys=tuple(keys),
        certificate_chains=tuple(chains),
        sigstore=tuple(identities),
        source=str(path),
    )


def _parse_signature(data: bytes) -> tuple[dict[str, Any], Any]:
    from model_signing._signing import sign_sigstore_pb
    from sigstore_models.bundle import v1 as bundle_pb

    if len(data) > _MAX_SIGNATURE:
        raise VerificationError("the producer signature is oversize")
    try:
        parsed = json.loads(data)
        material = parsed["verificationMaterial"]
        if "tlogEntries" not in material:
            material["tlogEntries"] = []
        if "publicKey" in material:
            material["publicKey"].setdefault("hint", None)
            for extra in ("rawBytes", "keyDetails"):
                material["publicKey"].pop(extra, None)
        return parsed, sign_sigstore_pb.Signature(bundle_pb.Bundle.from_dict(parsed))
    except Exception:
        raise VerificationError("the producer signature is malformed") from None


def _manifest_digests(manifest: Any) -> dict[str, str]:
    return {d.identifier: d.digest.digest_hex for d in manifest.resource_descriptors()}


def verify_signature(data: bytes, policy: TrustPolicy) -> VerifiedSignature:
    """Verify a producer signature against ``policy``; return what it signs.

    Raises :class:`VerificationError` when no accepted producer made it.
    """
    from model_signing._signing import sign_certificate, sign_ec_key

    parsed, signature = _parse_signature(data)
    material = parsed.get("verificationMaterial", {})
    attempts: list[Any] = []
    if "publicKey" in material:
        hint = material["publicKey"].get("hint")
        for key, key_id in zip(policy.keys, policy.key_ids, strict=True):
            if hint and hint != key_id:
                continue
            verifier = sign_ec_key.Verifier.__new__(sign_ec_key.Verifier)
            verifier._public_key = key
            attempts.append((f"key:{key_id[:16]}", verifier))
    elif "x509CertificateChain" in material or "certificate" in material:
        for chain in policy.certificate_chains:
            try:
                attempts.append((f"chain:{chain[0].name}", sign_certificate.Verifier(chain)))
            except (OSError, ValueError) as exc:
                raise InvalidInputError(
                    f"cannot load certificate chain {chain[0]}: {exc}"
                ) from None
        if policy.sigstore and "tlogEntries" in material and material["tlogEntries"]:
            return _verify_sigstore(data, policy)
    for name, verifier in attempts:
        try:
            manifest = verifier.verify(signature)
        except Exception:  # noqa: S112 - try the next accepted signer
            continue
        return VerifiedSignature(name, manifest.model_name, _manifest_digests(manifest))
    raise VerificationError(
        f"the bundle is not signed by a producer that the trust policy {policy.source} accepts",
        hint="check the trust policy or ask the producer which key signed it",
    )


def _verify_sigstore(data: bytes, policy: TrustPolicy) -> VerifiedSignature:
    from model_signing._signing import sign_sigstore

    with tempfile.TemporaryDirectory() as tmp:
        sig_path = Path(tmp) / "signature.sigstore.json"
        sig_path.write_bytes(data)
        try:
            signature = sign_sigstore.Signature.read(sig_path)
        except Exception:
            raise VerificationError("the sigstore signature is malformed") from None
    for identity in policy.sigstore:
        try:
            verifier = sign_sigstore.Verifier(
                identity=identity.identity, oidc_issuer=identity.issuer
            )
            manifest = verifier.verify(signature)
        except Exception:  # noqa: S112 - try the next accepted identity
            continue
        return VerifiedSignature(
            f"sigstore:{identity.identity}", manifest.model_name, _manifest_digests(manifest)
        )
    raise VerificationError("no sigstore identity in the trust policy verified this signature")


def signature_summary(data: bytes) -> dict[str, Any]:
    """What a signature claims, without verifying it (for ``edgepack inspect``)."""
    try:
        parsed = json.loads(data)
        envelope = parsed["dsseEnvelope"]
        statement = json.loads(base64.b64decode(envelope["payload"]))
        material = parsed["verificationMaterial"]
        kind = "key" if "publicKey" in material else "certificate"
        hint = material.get("publicKey", {}).get("hint")
        return {
            "kind": kind,
            "key_id": hint,
            "predicate_type": statement.get("predicateType"),
            "resources": len(statement.get("predicate", {}).get("resources", [])),
        }
    except Exception:
        return {"kind": "unreadable"}


def open_signer(
    sign_key: Path | None,
    *,
    certificate: Path | None = None,
    chain: Sequence[Path] = (),
    sigstore: bool = False,
    identity_token: str | None = None,
    passphrase_env: str | None = None,
) -> ProducerSigner:
    """The producer signer the command-line options name.

    ``--sign-key`` alone: a local EC key. With ``--sign-cert`` (and
    ``--sign-chain``): that key with its X.509 certificate chain. ``--sigstore``:
    keyless signing through sigstore (no key file; needs the network).
    """
    from edgepack.keys import load_signing_key

    if sigstore:
        if sign_key is not None or certificate is not None:
            raise InvalidInputError(
                "--sigstore signs without a key file; drop --sign-key/--sign-cert"
            )
        return SigstoreSigner(identity_token)
    if sign_key is None:
        raise InvalidInputError(
            "no signer given", hint="pass --sign-key KEY (or --sigstore for keyless)"
        )
    if certificate is not None:
        return CertificateSigner(sign_key, certificate, chain, passphrase_env)
    if chain:
        raise InvalidInputError(
            "--sign-chain needs --sign-cert", hint="pass the signing certificate too"
        )
    return load_signing_key(sign_key, passphrase_env)
