"""Verify a bundle's producer signature in a child process.

The verifier (model-signing, which imports sigstore, pydantic and requests) weighs
about 25 MB of resident memory that Python never gives back once imported. The
daemon installs a release every few weeks and idles in between, so it runs the
check in a short-lived child, as it runs the health check: the daemon's idle RSS
stays what it was before the first install (docs/benchmarks.md "Agent footprint").
The child also keeps the parsing of an untrusted signature out of the daemon.

The child gets the signature bytes and the trust policy (public keys as PEM,
certificate-chain paths, sigstore identities) on stdin and prints one result line;
the parent turns it back into a :class:`~edgepack.signing.VerifiedSignature` or
raises the child's error with its message and hint.
"""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from device_agent import _child
from edgepack import errors
from edgepack.signing import SigstoreIdentity, TrustPolicy, VerifiedSignature

CHILD_MODULE = _CHILD = "device_agent.sigcheck"
_RESULT_PREFIX = "edgepack-signature-result "
# Errors the child may report by name; anything else is a verification failure.
_ERRORS: dict[str, type[errors.EdgepackError]] = {
    cls.__name__: cls
    for cls in (
        errors.VerificationError,
        errors.InvalidInputError,
        errors.KeyFileError,
        errors.TransportError,
        errors.BundleFormatError,
    )
}
TIMEOUT_S = 600.0  # sigstore keyless verification may fetch its trust root


def _policy_to_json(policy: TrustPolicy) -> dict[str, Any]:
    return {
        "keys": [
            k.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ).decode()
            for k in policy.keys
        ],
        "certificate_chains": [[str(p) for p in chain] for chain in policy.certificate_chains],
        "sigstore": [[i.identity, i.issuer] for i in policy.sigstore],
        "source": policy.source,
    }


def _policy_from_json(doc: dict[str, Any]) -> TrustPolicy:
    from cryptography.hazmat.primitives.asymmetric import ec

    keys = []
    for pem in doc["keys"]:
        key = serialization.load_pem_public_key(pem.encode())
        if not isinstance(key, ec.EllipticCurvePublicKey):  # the parent sends only these
            raise errors.InvalidInputError("the trust policy holds a key that is not EC")
        keys.append(key)
    return TrustPolicy(
        keys=tuple(keys),
        certificate_chains=tuple(tuple(Path(p) for p in c) for c in doc["certificate_chains"]),
        sigstore=tuple(SigstoreIdentity(i, s) for i, s in doc["sigstore"]),
        source=str(doc["source"]),
    )


def verify_signature_isolated(
    data: bytes, policy: TrustPolicy, warm: _child.Warm | None = None
) -> VerifiedSignature:
    """:func:`edgepack.signing.verify_signature` in a child process; same result, same errors.

    ``warm``: a child of this module started ahead (its imports done), used instead."""
    request = {"signature": base64.b64encode(data).decode(), "policy": _policy_to_json(policy)}
    try:
        result = _child.call(_CHILD, _RESULT_PREFIX, request, TIMEOUT_S, warm)
    except subprocess.TimeoutExpired:
        raise errors.VerificationError(
            f"the producer signature was not verified within {TIMEOUT_S:g} s"
        ) from None
    except _child.ChildEndedError as exc:
        raise errors.VerificationError(
            f"the producer signature could not be verified: the verifying process {exc.why}"
        ) from None
    if "error" in result:
        err = result["error"]
        cls = _ERRORS.get(str(err.get("type")), errors.VerificationError)
        raise cls(str(err.get("message")), hint=err.get("hint"))
    return VerifiedSignature(
        str(result["signer"]), str(result["model_name"]), dict(result["digests"])
    )


def _child_main() -> None:
    """Verify one signature from a JSON request on stdin; print the result as one line."""
    from edgepack.signing import verify_signature

    request = _child.request()
    result: dict[str, Any]
    try:
        verified = verify_signature(
            base64.b64decode(request["signature"]), _policy_from_json(request["policy"])
        )
        result = {
            "signer": verified.signer,
            "model_name": verified.model_name,
            "digests": verified.digests,
        }
    except errors.EdgepackError as exc:
        result = {"error": {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint}}
    _child.answer(_RESULT_PREFIX, result)


if __name__ == "__main__":
    _child_main()
