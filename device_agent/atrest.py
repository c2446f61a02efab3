"""Encrypted revisions: the bundle's ciphertext kept as installed, decrypted only in memory.

An ``encrypted`` revision folder (``DATA/models/NAME/REV/``) holds two files:

* ``bundle.epk`` — the bundle exactly as downloaded and checked against TUF (the
  one write of an install: the download is renamed into place, never copied);
* ``key.sealed`` — the bundle's content key sealed with the device's storage key
  (``device_agent.keyprotect``): ``nonce (12 bytes) || AES-256-GCM(content key)``,
  associated data ``edgepack-at-rest-v1\\0NAME\\0REVISION\\0SHA256(meta/bundle.json)``.
  The associated data binds the key to this model, this revision and this exact
  metadata, so a ``key.sealed`` moved to another revision, or a ``bundle.json``
  edited on disk, does not open.

Loading decrypts the payload stream into one buffer in memory: every segment's
AES-GCM tag is checked as it is opened (a flipped bit anywhere in the ciphertext
refuses the whole revision), and the files are views into that buffer. Nothing
plaintext is written to disk. The per-file digests of the signed manifest were
checked once, while the bundle downloaded (``device_agent.streamcheck``);
``check_digests=True`` checks them again (the health check does, before a
revision becomes known good).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from device_agent._crashpoint import crashpoint
from device_agent.errors import CorruptRevisionError
from edgepack.bundle.metadata import PayloadFile
from edgepack.bundle.reader import BundleInfo, read_info
from edgepack.crypto import KEY_SIZE, TAG_SIZE, StreamOpener, segment_count
from edgepack.errors import EdgepackError

BUNDLE_FILE = "bundle.epk"
KEY_FILE = "key.sealed"
_AAD_PREFIX = b"edgepack-at-rest-v1\x00"
_NONCE = 12


def is_encrypted(revision_dir: Path) -> bool:
    """True for a revision kept encrypted (it holds ``bundle.epk``)."""
    return (revision_dir / BUNDLE_FILE).is_file()


def _aad(name: str, revision: str, metadata_sha256: str) -> bytes:
    return _AAD_PREFIX + "\x00".join((name, revision, metadata_sha256)).encode()


def seal_content_key(
    storage_key: bytes, content_key: bytes, *, name: str, revision: str, metadata_sha256: str
) -> bytes:
    """``key.sealed``'s bytes for a revision."""
    nonce = os.urandom(_NONCE)
    aead = AESGCM(storage_key)
    return nonce + aead.encrypt(nonce, content_key, _aad(name, revision, metadata_sha256))


def unseal_content_key(
    sealed: bytes, storage_key: bytes, *, name: str, revision: str, metadata_sha256: str
) -> bytes:
    """Open ``key.sealed``; :class:`CorruptRevisionError` when it does not belong here."""
    try:
        key = AESGCM(storage_key).decrypt(
            sealed[:_NONCE], sealed[_NONCE:], _aad(name, revision, metadata_sha256)
        )
    except (InvalidTag, ValueError):
        raise CorruptRevisionError(
            f"the content key of {name} {revision} does not open: its key file or metadata "
            "was altered, or the device's storage key changed",
            hint="`edgepack-agent run --once` falls back to an intact revision and reinstalls",
        ) from None
    if len(key) != KEY_SIZE:
        raise CorruptRevisionError(f"the content key of {name} {revision} is malformed")
    return key


@dataclass
class DecryptedRevision:
    """A revision's payload in memory: ``files`` are views into one buffer."""

    info: BundleInfo
    files: dict[str, memoryview]
    _buffer: bytearray = field(repr=False)

    @property
    def model_bytes(self) -> int:
        """How many plaintext bytes are held."""
        return len(self._buffer)

    def wipe(self) -> None:
        """Overwrite the plaintext (best effort: copies onnxruntime made are its own)."""
        for view in self.files.values():
            view.release()
        self.files = {}
        self._buffer[:] = bytes(len(self._buffer))


def _corrupt(what: str, why: str) -> CorruptRevisionError:
    return CorruptRevisionError(
        f"{what} is damaged: {why}",
        hint="`edgepack-agent run --once` falls back to an intact revision and reinstalls",
    )


def decrypt_bundle(
    bundle_path: Path, content_key: bytes, *, check_digests: bool = False, what: str = ""
) -> DecryptedRevision:
    """Decrypt a bundle's payload into memory, checking every segment's tag."""
    what = what or str(bundle_path)
    try:
        info = read_info(bundle_path)
    except EdgepackError as exc:
        raise _corrupt(what, exc.diagnostics()) from None
    header = info.encryption
    size = sum(f.size for f in info.manifest)
    seg = header.segment_size
    count = segment_count(size, seg)
    buffer = bytearray(size)
    opener = StreamOpener(content_key, header.nonce_prefix)
    cipher = bytearray(seg + TAG_SIZE)
    remaining = info.payload_length
    try:
        with open(bundle_path, "rb", buffering=0) as handle:
            handle.seek(info.payload_offset)
            out = 0
            for index in range(count):
                want = min(seg + TAG_SIZE, remaining)
                view = memoryview(cipher)[:want]
                got = 0
                while got < want:
                    n = handle.readinto(view[got:])
                    if not n:
                        raise _corrupt(what, "the encrypted payload is truncated")
                    got += n
                remaining -= want
                plain_len = want - TAG_SIZE
                if out + plain_len > size:
                    raise _corrupt(what, "the encrypted payload is longer than its manifest")
                target = memoryview(buffer)[out : out + plain_len]  # opened in place
                try:
                    opener.open(view, target, last=index == count - 1)
                except EdgepackError:
                    raise _corrupt(
                        what, f"segment {index} of its ciphertext fails authentication"
                    ) from None
                out += plain_len
                crashpoint("decrypt-memory")
    except OSError as exc:
        raise _corrupt(what, f"cannot read {bundle_path.name}: {exc.strerror}") from None
    files: dict[str, memoryview] = {}
    offset = 0
    whole = memoryview(buffer)
    for entry in info.manifest:
        files[entry.path] = whole[offset : offset + entry.size]
        offset += entry.size
    if check_digests:
        _check_digests(info.manifest, files, what)
    return DecryptedRevision(info, files, buffer)


def _check_digests(
    manifest: tuple[PayloadFile, ...], files: dict[str, memoryview], what: str
) -> None:
    for entry in manifest:
        if hashlib.sha256(files[entry.path]).hexdigest() != entry.sha256:
            raise _corrupt(what, f"{entry.path} does not match its signed digest")


def open_revision(
    revision_dir: Path,
    storage_key: bytes,
    *,
    name: str,
    revision: str,
    check_digests: bool = False,
) -> DecryptedRevision:
    """Unseal a revision's content key and decrypt its payload into memory."""
    what = f"the revision {revision} of {name}"
    bundle_path = revision_dir / BUNDLE_FILE
    try:
        sealed = (revision_dir / KEY_FILE).read_bytes()
        metadata_sha256 = read_info(bundle_path).metadata_sha256
    except FileNotFoundError as exc:
        raise _corrupt(what, f"{Path(str(exc.filename)).name} is missing") from None
    except OSError as exc:
        raise _corrupt(what, f"cannot read it: {exc.strerror}") from None
    except EdgepackError as exc:
        raise _corrupt(what, exc.diagnostics()) from None
    key = unseal_content_key(
        sealed, storage_key, name=name, revision=revision, metadata_sha256=metadata_sha256
    )
    return decrypt_bundle(bundle_path, key, check_digests=check_digests, what=what)
