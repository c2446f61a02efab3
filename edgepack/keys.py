"""Key files: generation, loading and the passphrase rules every command shares.

Private keys are PKCS#8 PEM, written 0600 (atomically), encrypted when a
passphrase is given. Passphrases come from the environment variable the user
names (``--passphrase-env VAR``, default ``EDGEPACK_PASSPHRASE``), else from the
systemd credential ``edgepack-passphrase`` (``LoadCredential=`` puts it in
``$CREDENTIALS_DIRECTORY``, readable by the service alone and never in its
environment), else from a prompt on a terminal; with none of them we fail with a
clear error instead of hanging on a prompt nobody can answer.
"""

from __future__ import annotations

import getpass
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from edgepack._atomic import write_atomic
from edgepack.errors import KeyFileError

if TYPE_CHECKING:
    from edgepack.signing import ProducerKeySigner

DEFAULT_PASSPHRASE_ENV = "EDGEPACK_PASSPHRASE"
# The name of the systemd credential that holds the passphrase (LoadCredential=NAME:FILE).
PASSPHRASE_CREDENTIAL = "edgepack-passphrase"
NO_PASSPHRASE_HINT = (
    f"set ${DEFAULT_PASSPHRASE_ENV}, name a variable with --passphrase-env, or under systemd "
    f"hand it over with LoadCredential={PASSPHRASE_CREDENTIAL}:FILE"
)
KeyKind = Literal["signing", "recipient"]

_MAX_KEY_FILE = 64 * 1024


def credential_passphrase() -> bytes | None:
    """The systemd credential ``edgepack-passphrase``, if the service was given one.

    systemd's ``LoadCredential=edgepack-passphrase:FILE`` copies FILE to
    ``$CREDENTIALS_DIRECTORY/edgepack-passphrase``; one trailing newline (what an
    editor or ``echo`` leaves) is not part of the passphrase.
    """
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / PASSPHRASE_CREDENTIAL
    try:
        with open(path, "rb") as handle:
            value = handle.read(_MAX_KEY_FILE + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KeyFileError(f"cannot read the credential {path}: {exc.strerror}") from None
    if len(value) > _MAX_KEY_FILE:
        raise KeyFileError(f"the credential {path} is too large to be a passphrase")
    if value.endswith(b"\r\n"):
        value = value[:-2]
    elif value.endswith(b"\n"):
        value = value[:-1]
    if not value:
        raise KeyFileError(f"the credential {path} is empty", hint="put the passphrase in it")
    return value


def resolve_passphrase(
    passphrase_env: str | None = None,
    *,
    purpose: str,
    required: bool,
    confirm: bool = False,
    missing_hint: str | None = None,
) -> bytes | None:
    """Find the passphrase for ``purpose`` by the shared rules.

    The order: the variable ``--passphrase-env`` names (which must then be
    set), ``$EDGEPACK_PASSPHRASE``, the systemd credential, a prompt on a
    terminal. ``required`` is true when opening an encrypted key (we must have
    one) and false when creating a key (no passphrase means an unencrypted
    key). ``missing_hint`` replaces the hint of the error raised when a
    passphrase is required and there is no terminal to ask on.
    """
    env_name = passphrase_env or DEFAULT_PASSPHRASE_ENV
    value = os.environ.get(env_name)
    if value is not None:
        if not value and required:
            raise KeyFileError(f"the passphrase in ${env_name} is empty", hint="set it or unset it")
        return value.encode() if value else None
    if passphrase_env is not None:
        raise KeyFileError(
            f"--passphrase-env names ${passphrase_env}, which is not set",
            hint=f"export {passphrase_env}=… or drop the option",
        )
    credential = credential_passphrase()
    if credential is not None:
        return credential
    if not sys.stdin.isatty():
        if not required:
            return None
        raise KeyFileError(
            f"{purpose} needs a passphrase and there is no terminal to ask on",
            hint=missing_hint or NO_PASSPHRASE_HINT,
        )
    first = getpass.getpass(f"Passphrase for {purpose}: ")
    if confirm:
        second = getpass.getpass("Repeat the passphrase: ")
        if first != second:
            raise KeyFileError("the passphrases do not match", hint="try again")
    if not first:
        if required:
            raise KeyFileError(f"{purpose} needs a passphrase", hint="type it at the prompt")
        return None
    return first.encode()


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, atomically (temp file, fsync, rename)."""
    write_atomic(path, data, mode=0o600)


def write_public_file(path: Path, data: bytes) -> None:
    """Write a public file (mode 0644) atomically."""
    write_atomic(path, data, mode=0o644)


def private_pem(
    key: ec.EllipticCurvePrivateKey | x25519.X25519PrivateKey, passphrase: bytes | None
) -> bytes:
    """PKCS#8 PEM of a private key, encrypted with the best available scheme when a passphrase is given."""
    algorithm: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, algorithm
    )


def public_pem(key: ec.EllipticCurvePublicKey | x25519.X25519PublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM of a public key."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True)
class KeyPairPaths:
    """Where a generated key pair was written."""

    private: Path
    public: Path


def generate_signing_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 producer signing key."""
    return ec.generate_private_key(ec.SECP256R1())


def generate_recipient_key() -> x25519.X25519PrivateKey:
    """A fresh X25519 recipient (device or fleet) key."""
    return x25519.X25519PrivateKey.generate()


def write_keypair(
    stem: Path,
    key: ec.EllipticCurvePrivateKey | x25519.X25519PrivateKey,
    passphrase: bytes | None = None,
    *,
    overwrite: bool = False,
) -> KeyPairPaths:
    """Write ``stem.key`` (0600) and ``stem.pub``; refuse to overwrite unless asked."""
    private_path = stem.with_name(stem.name + ".key")
    public_path = stem.with_name(stem.name + ".pub")
    if not overwrite:
        for existing in (private_path, public_path):
            if existing.exists():
                raise KeyFileError(
                    f"{existing} already exists",
                    hint="choose another -o PATH or remove the old key first",
                )
    write_private_file(private_path, private_pem(key, passphrase))
    write_public_file(public_path, public_pem(key.public_key()))
    return KeyPairPaths(private_path, public_path)


def write_recipient_keypair(
    stem: Path, key: x25519.X25519PrivateKey, passphrase: bytes | None = None
) -> KeyPairPaths:
    """Write an X25519 key pair as ``stem.key`` and ``stem.pub``."""
    return write_keypair(stem, key, passphrase)


def _read_key_file(path: Path, *, private: bool) -> bytes:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist", hint="check the path") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"key file {path} is not a regular file")
    if info.st_size > _MAX_KEY_FILE:
        raise KeyFileError(f"{path} is too large to be a key file")
    if private and info.st_mode & 0o077:
        raise KeyFileError(
            f"private key {path} is readable by other users (mode {stat.S_IMODE(info.st_mode):04o})",
            hint=f"run: chmod 600 {path}",
        )
    return path.read_bytes()


def _load_private(path: Path, passphrase_env: str | None, purpose: str) -> object:
    data = _read_key_file(path, private=True)
    if b"PRIVATE KEY" not in data:
        raise KeyFileError(
            f"{path} is not a private key (PEM)", hint="pass the .key file, not the .pub"
        )
    encrypted = b"ENCRYPTED PRIVATE KEY" in data
    passphrase = (
        resolve_passphrase(passphrase_env, purpose=f"{purpose} {path}", required=True)
        if encrypted
        else None
    )
    try:
        return serialization.load_pem_private_key(data, password=passphrase)
    except (ValueError, TypeError):
        if encrypted:
            raise KeyFileError(
                f"wrong passphrase for {path}", hint="check the passphrase"
            ) from None
        raise KeyFileError(f"{path} is not a valid private key") from None


def load_signing_private_key(
    path: Path, passphrase_env: str | None = None
) -> ec.EllipticCurvePrivateKey:
    """Open an EC P-256 producer signing key, refusing other kinds."""
    key = _load_private(path, passphrase_env, "signing key")
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise KeyFileError(
            f"{path} is not an EC P-256 signing key",
            hint="create one with: edgepack keys generate signing -o PATH",
        )
    return key


def load_recipient_private_key(
    path: Path, passphrase_env: str | None = None
) -> x25519.X25519PrivateKey:
    """Open an X25519 recipient private key, refusing other kinds."""
    key = _load_private(path, passphrase_env, "recipient key")
    if not isinstance(key, x25519.X25519PrivateKey):
        raise KeyFileError(
            f"{path} is not an X25519 recipient key",
            hint="create one with: edgepack keys generate recipient -o PATH",
        )
    return key


def _load_public(path: Path, *, one_key_hint: str = "keep one key per file") -> object:
    data = _read_key_file(path, private=False)
    if b"PRIVATE KEY" in data:
        raise KeyFileError(
            f"{path} holds a private key where a public key was expected", hint="pass the .pub file"
        )
    # PEM loaders read the first block and ignore the rest: a file of several keys
    # would silently stand for its first one.
    blocks = data.count(b"-----BEGIN ")
    if blocks > 1:
        raise KeyFileError(f"{path} holds {blocks} PEM blocks, not one key", hint=one_key_hint)
    try:
        return serialization.load_pem_public_key(data)
    except ValueError:
        raise KeyFileError(f"{path} is not a PEM public key") from None


def load_recipient_public_key(path: Path) -> x25519.X25519PublicKey:
    """Open an X25519 recipient public key (a device's or a fleet's ``.pub``)."""
    key = _load_public(
        path, one_key_hint="put each key in its own file and pass --recipient once per key"
    )
    if not isinstance(key, x25519.X25519PublicKey):
        raise KeyFileError(
            f"{path} is not an X25519 recipient public key",
            hint="recipients are made by: edgepack keys generate recipient, or edgepack-agent enroll",
        )
    return key


def load_signing_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Open an EC P-256 producer public key."""
    key = _load_public(path)
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise KeyFileError(f"{path} is not an EC P-256 public key")
    return key


def load_signing_key(path: Path, passphrase_env: str | None = None) -> ProducerKeySigner:
    """Open a producer signing key as a signer object for :func:`edgepack.bundle.pack`."""
    from edgepack.signing import ProducerKeySigner

    return ProducerKeySigner(load_signing_private_key(path, passphrase_env))
