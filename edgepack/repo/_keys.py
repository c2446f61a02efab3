"""Role keys of the repository: generate, store, and open them as TUF signers.

A key is named by a *spec*: either a path to a PEM private key file
(passphrase-protected PKCS#8 by default, mode 0600) or a securesystemslib
signer URI (``file2:``, ``hsm:``, ``gcpkms:``, ``awskms:``, ``azurekms:``,
``hashivault:``). For a URI the matching public key is found among the keys
the role trusts by signing a probe, so HSM and KMS keys need no extra
configuration.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from edgepack.errors import KeyFileError
from edgepack.repo._tuf import SIGNER_FOR_URI_SCHEME, CryptoSigner, Key, Signer, SSlibKey

PassphraseSource = Callable[[str], bytes | None]
"""Given what a passphrase is for, return it (or None when there is none)."""

_URI_RE = re.compile(r"^([a-z][a-z0-9+.-]*):")
_MAX_KEY_FILE = 64 * 1024
_PROBE = b"edgepack signer probe"


def no_passphrase(_purpose: str) -> bytes | None:
    """A passphrase source for unencrypted keys."""
    return None


def is_signer_uri(spec: str) -> bool:
    """Whether ``spec`` names a securesystemslib signer rather than a file."""
    match = _URI_RE.match(spec)
    return bool(match) and match.group(1) in SIGNER_FOR_URI_SCHEME  # type: ignore[union-attr]


def generate_role_key(path: Path, passphrase: bytes | None) -> CryptoSigner:
    """Create an Ed25519 key: ``path`` (PEM, 0600, encrypted when given a passphrase)
    and ``path.pub``. Returns it as a signer (``.public_key`` is the TUF key)."""
    key = ed25519.Ed25519PrivateKey.generate()
    algorithm: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, algorithm
    )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())
    public = key.public_key()
    pub_path = path.with_name(path.name + ".pub")
    pub_path.write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return CryptoSigner(key)


def load_public_key(path: Path) -> SSlibKey:
    """Open a PEM public key (Ed25519, ECDSA P-256/P-384 or RSA) as a TUF key."""
    data = _read(path)
    if b"PRIVATE KEY" in data:
        raise KeyFileError(
            f"{path} holds a private key where a public key was expected",
            hint="pass the .pub file",
        )
    try:
        public = serialization.load_pem_public_key(data)
        return SSlibKey.from_crypto(public)
    except (ValueError, TypeError):
        raise KeyFileError(f"{path} is not a supported PEM public key") from None


def open_signer(
    spec: str,
    *,
    base: Path | None,
    passphrase: PassphraseSource,
    trusted: Iterable[Key],
    role: str,
) -> Signer:
    """Open the key named by ``spec`` and check that ``role`` trusts it.

    ``trusted`` are the public keys the role's delegator lists for it; a key
    outside them is refused here, before anything is signed.
    """
    candidates = list(trusted)
    if is_signer_uri(spec):
        return _open_uri(spec, candidates, role)
    path = Path(spec)
    if base is not None and not path.is_absolute():
        path = base / path
    signer = _open_pem(path, passphrase)
    keyid = signer.public_key.keyid
    if keyid not in {k.keyid for k in candidates}:
        raise KeyFileError(
            f"key {path} is not a key of role {role!r}",
            hint="use the key the repository delegated this role to",
        )
    return signer


def _open_uri(uri: str, candidates: list[Key], role: str) -> Signer:
    for key in candidates:
        try:
            signer = Signer.from_priv_key_uri(uri, key)
            signature = signer.sign(_PROBE)
            key.verify_signature(signature, _PROBE)
        except Exception:  # noqa: S112 - any failure means "not this key"; try the next
            continue
        return signer
    raise KeyFileError(
        f"signer {uri} does not hold a key of role {role!r}",
        hint="check the URI and that the role was set up with this key",
    )


def _open_pem(path: Path, passphrase: PassphraseSource) -> CryptoSigner:
    data = _read(path, private=True)
    if b"PRIVATE KEY" not in data:
        raise KeyFileError(f"{path} is not a PEM private key", hint="pass the .key file")
    encrypted = b"ENCRYPTED PRIVATE KEY" in data
    secret = passphrase(f"key {path}") if encrypted else None
    if encrypted and not secret:
        raise KeyFileError(f"{path} is encrypted and no passphrase was given")
    try:
        private = serialization.load_pem_private_key(data, password=secret)
    except (ValueError, TypeError):
        if encrypted:
            raise KeyFileError(
                f"wrong passphrase for {path}", hint="check the passphrase"
            ) from None
        raise KeyFileError(f"{path} is not a valid private key") from None
    try:
        return CryptoSigner(private)
    except (ValueError, TypeError):
        raise KeyFileError(f"{path} is a kind of key TUF cannot sign with") from None


def _read(path: Path, *, private: bool = False) -> bytes:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist", hint="check the path") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_KEY_FILE:
        raise KeyFileError(f"{path} is not a key file")
    if private and info.st_mode & 0o077:
        raise KeyFileError(
            f"private key {path} is readable by other users "
            f"(mode {stat.S_IMODE(info.st_mode):04o})",
            hint=f"run: chmod 600 {path}",
        )
    return path.read_bytes()
