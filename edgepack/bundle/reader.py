"""Read, verify and unpack bundles, safely and in one streaming pass.

Order of checks, cheapest and most decisive first: the container's structure
and bounds; the metadata's schema and paths; the producer signature against
the trust policy (before any decryption work); then, given a recipient key,
streaming decryption into a fresh staging directory with every payload digest
checked. On any failure the staging directory is removed: nothing half
written survives, and nothing is ever written outside it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric import x25519

from edgepack.bundle import _container
from edgepack.bundle._pieces import hash_pieces
from edgepack.bundle.metadata import (
    DEFAULT_LIMITS,
    MEMBER_ORDER,
    META_BUNDLE,
    META_ENCRYPTION,
    META_SIGNATURE,
    PAYLOAD,
    EncryptionHeader,
    Limits,
    PayloadFile,
    hpke_info,
    parse_bundle_json,
    parse_encryption_json,
)
from edgepack.crypto import TAG_SIZE, StreamOpener, ciphertext_size, segment_count, unwrap_key
from edgepack.errors import BundleFormatError, DecryptionError, InvalidInputError, VerificationError
from edgepack.signing import TrustPolicy, VerifiedSignature, signature_summary, verify_signature


@dataclass(frozen=True)
class BundleInfo:
    """What a bundle says about itself, readable without any key."""

    path: Path
    name: str
    version: str
    profile: str | None
    architectures: tuple[str, ...]
    metadata: dict[str, Any]
    manifest: tuple[PayloadFile, ...]
    metadata_sha256: str
    size: int
    encryption: EncryptionHeader = field(repr=False)
    signature: bytes = field(repr=False)
    payload_offset: int = field(repr=False)
    payload_length: int = field(repr=False)

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly description (``edgepack inspect --json``)."""
        return {
            "path": str(self.path),
            "size": self.size,
            "name": self.name,
            "version": self.version,
            "profile": self.profile,
            "architectures": list(self.architectures),
            "metadata_sha256": self.metadata_sha256,
            "metadata": self.metadata,
            "encryption": {
                "scheme": "AES-256-GCM-STREAM-v1",
                "segment_size": self.encryption.segment_size,
                "recipients": sorted(r.key_id for r in self.encryption.recipients),
            },
            "signature": signature_summary(self.signature),
        }


def _read_exact(handle: BinaryIO, offset: int, size: int) -> bytes:
    handle.seek(offset)
    data = handle.read(size)
    if len(data) != size:
        raise BundleFormatError("the bundle is truncated")
    return data


def read_info(path: Path, limits: Limits = DEFAULT_LIMITS) -> BundleInfo:
    """Parse and validate a bundle's container and metadata (no key, no signature check)."""
    try:
        info = path.lstat()
    except OSError as exc:
        raise InvalidInputError(f"cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise InvalidInputError(f"{path} is not a regular file")
    with open(path, "rb") as handle:
        members = _container.read_members(
            handle,
            info.st_size,
            MEMBER_ORDER,
            {
                META_ENCRYPTION: limits.max_encryption_json,
                META_BUNDLE: limits.max_bundle_json,
                META_SIGNATURE: limits.max_signature,
            },
        )
        by_name = {m.name: m for m in members}
        enc = by_name[META_ENCRYPTION]
        meta = by_name[META_BUNDLE]
        sig = by_name[META_SIGNATURE]
        encryption = parse_encryption_json(_read_exact(handle, enc.offset, enc.size), limits)
        bundle_bytes = _read_exact(handle, meta.offset, meta.size)
        signature = _read_exact(handle, sig.offset, sig.size)
    document, manifest = parse_bundle_json(bundle_bytes, limits)
    payload = by_name[PAYLOAD]
    expected = ciphertext_size(sum(f.size for f in manifest), encryption.segment_size)
    if payload.size != expected:
        raise BundleFormatError(
            "the encrypted payload's size does not match its manifest (truncated or altered)"
        )
    return BundleInfo(
        path=path,
        name=document["name"],
        version=document["version"],
        profile=document.get("profile"),
        architectures=tuple(document["architectures"]),
        metadata=document,
        manifest=tuple(manifest),
        metadata_sha256=hashlib.sha256(bundle_bytes).hexdigest(),
        size=info.st_size,
        encryption=encryption,
        signature=signature,
        payload_offset=payload.offset,
        payload_length=payload.size,
    )


# How a producer signature is verified: in-process by default; the device agent passes
# one that runs in a child process (device_agent/sigcheck.py) to keep its memory small.
SignatureVerifier = Callable[[bytes, TrustPolicy], VerifiedSignature]


def check_signature(
    info: BundleInfo, policy: TrustPolicy, verifier: SignatureVerifier = verify_signature
) -> VerifiedSignature:
    """Verify the producer signature and that it signs exactly this metadata and manifest."""
    verified = verifier(info.signature, policy)
    expected = {f.path: f.sha256 for f in info.manifest}
    expected[META_BUNDLE] = info.metadata_sha256
    if verified.digests != expected or verified.model_name != info.name:
        raise VerificationError(
            "the producer signature does not match this bundle's metadata (edited after signing?)",
            hint="do not use this bundle; ask the producer for a fresh one",
        )
    return verified


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of :func:`verify`."""

    info: BundleInfo
    signer: str
    decrypted: bool
    payload_bytes: int

    def summary(self) -> dict[str, Any]:
        """JSON-friendly form for ``edgepack verify --json``."""
        return {
            "ok": True,
            "path": str(self.info.path),
            "name": self.info.name,
            "version": self.info.version,
            "profile": self.info.profile,
            "signer": self.signer,
            "payload_checked": self.decrypted,
            "payload_bytes": self.payload_bytes,
        }


def verify(
    path: Path,
    policy: TrustPolicy,
    recipient_key: x25519.X25519PrivateKey | None = None,
    *,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Check structure and signature; with a recipient key, decrypt in a stream and check every digest.

    Decrypted bytes are hashed and dropped; nothing is written to disk.
    """
    info = read_info(path)
    verified = check_signature(info, policy)
    if recipient_key is None:
        return VerifyReport(info, verified.signer, False, 0)
    total = _decrypt_stream(info, recipient_key, None, progress)
    return VerifyReport(info, verified.signer, True, total)


def unpack(
    path: Path,
    dest_dir: Path,
    *,
    recipient_key: x25519.X25519PrivateKey | bytes,
    policy: TrustPolicy,
    progress: Callable[[int], None] | None = None,
    verifier: SignatureVerifier = verify_signature,
) -> BundleInfo:
    """Verify and decrypt ``path`` into the new directory ``dest_dir``; remove it on any failure.

    ``recipient_key`` is a recipient private key listed in the bundle, or the content
    key itself (32 bytes, as a per-device key envelope delivers it).
    ``verifier`` checks the producer signature (see :data:`SignatureVerifier`).
    """
    info = read_info(path)
    check_signature(info, policy, verifier)
    try:
        dest_dir.mkdir(mode=0o700)
    except FileExistsError:
        raise InvalidInputError(
            f"{dest_dir} already exists", hint="unpack into a new directory"
        ) from None
    try:
        _decrypt_stream(info, recipient_key, dest_dir, progress)
    except BaseException:
        shutil.rmtree(dest_dir, ignore_errors=True)
        raise
    return info


class _Sink:
    """Splits the decrypted stream into the manifest's files inside ``dest`` (or only hashes it)."""

    # Start writing a file's pages back while we still decrypt, instead of paying
    # for the whole file in the final fsync (and being throttled on dirty pages).
    FLUSH_EVERY = 32 * 1024 * 1024

    def __init__(self, manifest: tuple[PayloadFile, ...], dest: Path | None) -> None:
        self._files = manifest
        self._dest = dest
        self._index = 0
        self._remaining = manifest[0].size if manifest else 0
        self._fd: int | None = None
        self._unflushed = 0
        self._flusher = ThreadPoolExecutor(max_workers=1) if dest is not None else None
        self._flushing: Future[None] | None = None
        self.hashers = [hashlib.sha256() for _ in manifest]

    def _flush_in_background(self) -> None:
        if self._flusher is None or self._fd is None:
            return
        if self._flushing is not None and not self._flushing.done():
            return
        if self._flushing is not None:
            self._flushing.result()
        self._flushing = self._flusher.submit(os.fdatasync, self._fd)
        self._unflushed = 0

    def _wait_flush(self) -> None:
        if self._flushing is not None:
            flushing, self._flushing = self._flushing, None
            flushing.result()

    def _open(self, entry: PayloadFile) -> int:
        assert self._dest is not None
        target = self._dest / entry.path
        parent = target.parent
        if parent != self._dest:
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        return os.open(target, flags, 0o600)

    def _advance(self) -> None:
        while self._index < len(self._files) and self._remaining == 0:
            if self._dest is not None:
                if self._fd is None:
                    self._fd = self._open(self._files[self._index])
                self._wait_flush()
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None
                self._unflushed = 0
            self._index += 1
            if self._index < len(self._files):
                self._remaining = self._files[self._index].size

    def split(self, data: memoryview) -> list[tuple[int, memoryview]]:
        """Cut ``data`` into per-file pieces, writing them when unpacking."""
        pieces: list[tuple[int, memoryview]] = []
        offset = 0
        self._advance()
        while offset < len(data):
            if self._index >= len(self._files):
                raise DecryptionError()
            take = min(self._remaining, len(data) - offset)
            piece = data[offset : offset + take]
            if self._dest is not None:
                if self._fd is None:
                    self._fd = self._open(self._files[self._index])
                view = piece
                while view:
                    view = view[os.write(self._fd, view) :]
                self._unflushed += len(piece)
                if self._unflushed >= self.FLUSH_EVERY:
                    self._flush_in_background()
            pieces.append((self._index, piece))
            offset += take
            self._remaining -= take
            self._advance()
        return pieces

    def finish(self) -> None:
        self._advance()
        if self._index != len(self._files):
            raise DecryptionError()

    def close(self) -> None:
        try:
            self._wait_flush()
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if self._flusher is not None:
                self._flusher.shutdown(wait=True)


def _decrypt_stream(
    info: BundleInfo,
    recipient_key: x25519.X25519PrivateKey | bytes,
    dest: Path | None,
    progress: Callable[[int], None] | None,
) -> int:
    header = info.encryption
    if isinstance(recipient_key, bytes):
        key = recipient_key
    else:
        key = unwrap_key(
            list(header.recipients),
            recipient_key,
            hpke_info(info.name, info.version, info.profile, header),
        )
    opener = StreamOpener(key, header.nonce_prefix)
    seg = header.segment_size
    payload_size = sum(f.size for f in info.manifest)
    count = segment_count(payload_size, seg)
    sink = _Sink(info.manifest, dest)
    cipher = bytearray(seg + TAG_SIZE)
    plains = [bytearray(seg), bytearray(seg)]
    pending: list[Future[None] | None] = [None, None]
    remaining = info.payload_length
    total = 0
    try:
        with (
            open(info.path, "rb", buffering=0) as handle,
            ThreadPoolExecutor(max_workers=1) as pool,
        ):
            handle.seek(info.payload_offset)
            for index in range(count):
                slot = index % 2
                previous = pending[slot]
                if previous is not None:
                    previous.result()
                want = min(seg + TAG_SIZE, remaining)
                view = memoryview(cipher)[:want]
                got = 0
                while got < want:
                    n = handle.readinto(view[got:])
                    if not n:
                        raise DecryptionError()
                    got += n
                remaining -= want
                plain = opener.open(view, plains[slot], last=index == count - 1)
                pending[slot] = pool.submit(hash_pieces, sink.hashers, sink.split(plain))
                total += len(plain)
                if progress is not None:
                    progress(len(plain))
            for future in pending:
                if future is not None:
                    future.result()
        sink.finish()
    finally:
        sink.close()
    for entry, hasher in zip(info.manifest, sink.hashers, strict=True):
        if hasher.hexdigest() != entry.sha256:
            raise VerificationError(
                f"payload file {entry.path!r} does not match its signed digest",
                hint="the bundle was altered; do not use it",
            )
    if dest is not None:
        _make_read_only(dest)
    return total


def _make_read_only(root: Path) -> None:
    """Unpacked files are read-only; whether directories are too is the installer's choice."""
    for directory, _dirs, files in os.walk(root):
        for name in files:
            os.chmod(Path(directory) / name, 0o444)
