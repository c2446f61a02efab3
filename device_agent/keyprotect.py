"""The device's keys at rest: the storage key that seals installed revisions' content keys.

An installed revision keeps the bundle's ciphertext (``device_agent.atrest``); its
content key is sealed with the device's **storage key**, 32 random bytes made once
per data directory. Applications that load models need the storage key, never the
device's recipient key (which opens new releases and stays the agent's alone).

Protection ``file``: ``DATA/models/.storage.key``, mode 0440 (the agent's user and
the applications' group). It protects a revision folder copied on its own (a backup,
a support bundle), not a stolen disk: the key lies on the same disk.
Protection ``tpm``: the key is sealed by a TPM 2.0 and only that TPM unseals it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from device_agent import _atomic
from edgepack.errors import KeyFileError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import x25519

    from device_agent.config import AgentConfig

STORAGE_KEY_SIZE = 32
STORAGE_KEY_FILE = ".storage.key"


def storage_key_path(data_dir: Path) -> Path:
    """Where the file-protected storage key lives (beside the revisions it opens)."""
    return data_dir / "models" / STORAGE_KEY_FILE


def ensure_storage_key(data_dir: Path, protection: str = "file", tcti: str = "") -> bytes:
    """The device's storage key, made now when the data directory has none yet."""
    path = storage_key_path(data_dir)
    if path.exists():
        return load_storage_key(data_dir)
    key = secrets.token_bytes(STORAGE_KEY_SIZE)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic.write_bytes(path, key, mode=0o440)
    return key


def load_storage_key(data_dir: Path) -> bytes:
    """Read the storage key; a clear :class:`KeyFileError` when it is missing or unusable."""
    path = storage_key_path(data_dir)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise KeyFileError(
            f"{path} is missing: the installed models cannot be decrypted",
            hint="`edgepack-agent run --once` makes a new key and installs the releases again",
        ) from None
    except OSError as exc:
        raise KeyFileError(
            f"cannot read the storage key {path}: {exc.strerror}",
            hint="run the application as a member of the agent's group",
        ) from None
    with os.fdopen(fd, "rb") as fh:
        key = fh.read(STORAGE_KEY_SIZE + 1)
    if len(key) != STORAGE_KEY_SIZE:
        raise KeyFileError(f"{path} is not a {STORAGE_KEY_SIZE}-byte storage key")
    return key


def load_recipient_key(config: AgentConfig, passphrase_env: str | None) -> x25519.X25519PrivateKey:
    """The device's recipient private key, however it is protected."""
    from edgepack.keys import load_recipient_private_key

    return load_recipient_private_key(Path(config.recipient_key), passphrase_env)
