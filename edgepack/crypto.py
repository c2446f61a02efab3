"""The payload's encryption: recipes over ``cryptography``'s primitives.

This is the one module that touches ``cryptography.hazmat`` for payload work.

* Payload: a random 256-bit content key; the plaintext is cut into fixed-size
  segments, each sealed with AES-256-GCM under a STREAM nonce
  ``prefix(7) || counter(4, big-endian) || last(1)``. Binding the counter and
  the last-segment flag into the nonce makes reordering, repeating, dropping,
  truncating and splicing segments fail authentication, in one pass.
* Key wrap: the content key is sealed to each recipient's X25519 public key
  with HPKE (RFC 9180, base mode, X25519 / HKDF-SHA256 / AES-256-GCM); HPKE's
  ``info`` binds the wrap to the bundle's identity and the stream parameters.

Every decryption failure raises the same :class:`DecryptionError`, so nothing
tells an attacker which check failed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgepack.errors import DecryptionError, VerificationError

KEY_SIZE = 32
NONCE_PREFIX_SIZE = 7
TAG_SIZE = 16
MAX_SEGMENTS = 2**32
STREAM_AAD = b"edgepack/v1 payload"
HPKE_SUITE_NAME = "HPKE-Base-X25519-HKDF-SHA256-AES256GCM"
STREAM_SUITE_NAME = "AES-256-GCM-STREAM-v1"

_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def new_content_key() -> bytes:
    """A fresh random 256-bit content key."""
    return os.urandom(KEY_SIZE)


def new_nonce_prefix() -> bytes:
    """A fresh random STREAM nonce prefix."""
    return os.urandom(NONCE_PREFIX_SIZE)


def segment_count(plaintext_size: int, segment_size: int) -> int:
    """How many segments a payload of ``plaintext_size`` bytes takes (at least one)."""
    return max(1, -(-plaintext_size // segment_size))


def ciphertext_size(plaintext_size: int, segment_size: int) -> int:
    """The exact size of the encrypted stream."""
    return plaintext_size + TAG_SIZE * segment_count(plaintext_size, segment_size)


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


class StreamSealer:
    """Seals payload segments in order; reuses the caller's output buffer."""

    def __init__(self, key: bytes, nonce_prefix: bytes) -> None:
        if len(key) != KEY_SIZE or len(nonce_prefix) != NONCE_PREFIX_SIZE:
            raise ValueError("bad content key or nonce prefix size")
        self._aead = AESGCM(key)
        self._prefix = nonce_prefix
        self._index = 0
        self._finished = False

    def seal(
        self, plaintext: memoryview | bytes | bytearray, out: bytearray, *, last: bool
    ) -> memoryview:
        """Seal the next segment into ``out`` (at least ``len(plaintext) + 16`` bytes)."""
        if self._finished or self._index >= MAX_SEGMENTS:
            raise ValueError("stream already finished")
        size = len(plaintext) + TAG_SIZE
        view = memoryview(out)[:size]
        self._aead.encrypt_into(
            _nonce(self._prefix, self._index, last), plaintext, STREAM_AAD, view
        )
        self._index += 1
        self._finished = last
        return view


class StreamOpener:
    """Opens payload segments in order; any failure is one opaque error."""

    def __init__(self, key: bytes, nonce_prefix: bytes) -> None:
        if len(key) != KEY_SIZE or len(nonce_prefix) != NONCE_PREFIX_SIZE:
            raise DecryptionError()
        self._aead = AESGCM(key)
        self._prefix = nonce_prefix
        self._index = 0
        self._finished = False

    def open(
        self, ciphertext: memoryview | bytes | bytearray, out: bytearray | memoryview, *, last: bool
    ) -> memoryview:
        """Open the next segment into ``out``; ``last`` must be true exactly for the final one."""
        if self._finished or len(ciphertext) < TAG_SIZE or self._index >= MAX_SEGMENTS:
            raise DecryptionError()
        size = len(ciphertext) - TAG_SIZE
        view = memoryview(out)[:size]
        try:
            self._aead.decrypt_into(
                _nonce(self._prefix, self._index, last), ciphertext, STREAM_AAD, view
            )
        except (InvalidTag, ValueError):
            raise DecryptionError() from None
        self._index += 1
        self._finished = last
        return view


# ----------------------------------------------------------------------------- key wrap


def recipient_key_id(public_key: x25519.X25519PublicKey) -> str:
    """A short stable identifier of a recipient key: sha256 of its raw bytes, 16 bytes hex."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:32]


@dataclass(frozen=True)
class WrappedKey:
    """The content key sealed to one recipient."""

    key_id: str
    sealed: bytes  # HPKE encapsulated key || ciphertext


def wrap_key(content_key: bytes, recipient: x25519.X25519PublicKey, info: bytes) -> WrappedKey:
    """Seal ``content_key`` to ``recipient`` with HPKE, bound to ``info``."""
    return WrappedKey(
        recipient_key_id(recipient), _SUITE.encrypt(content_key, recipient, info=info)
    )


def unwrap_key(
    wrapped: list[WrappedKey], private_key: x25519.X25519PrivateKey, info: bytes
) -> bytes:
    """Find and open the wrap meant for ``private_key``; opaque failure otherwise."""
    key_id = recipient_key_id(private_key.public_key())
    for entry in wrapped:
        if entry.key_id != key_id:
            continue
        try:
            key = _SUITE.decrypt(entry.sealed, private_key, info=info)
        except (InvalidTag, ValueError):
            raise DecryptionError() from None
        if len(key) != KEY_SIZE:
            raise DecryptionError()
        return key
    raise VerificationError(
        f"the bundle is not encrypted for this recipient key (id {key_id})",
        hint="use the key of a device or fleet the bundle was packed for",
    )
