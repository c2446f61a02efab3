"""Pack a model directory into a bundle in one pass, with memory independent of model size.

The payload files are read once: each segment is hashed (per file, in a worker
thread — ``hashlib`` releases the GIL) while the main thread seals the previous
bytes and writes them. The manifest and signature, which depend on those
digests, are written after the payload; readers find them by walking the
container's headers.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric import x25519

from edgepack import versions
from edgepack._version import __version__
from edgepack.bundle import _container
from edgepack.bundle._monitoring import check_monitoring
from edgepack.bundle._pieces import hash_pieces
from edgepack.bundle.metadata import (
    FORMAT,
    FORMAT_VERSION,
    META_BUNDLE,
    META_ENCRYPTION,
    META_SIGNATURE,
    PAYLOAD,
    EncryptionHeader,
    bundle_file_name,
    canonical_json,
    check_name,
    check_payload_path,
    check_profile,
    check_version,
    hpke_info,
)
from edgepack.crypto import (
    StreamSealer,
    ciphertext_size,
    new_content_key,
    new_nonce_prefix,
    segment_count,
    wrap_key,
)
from edgepack.errors import BundleFormatError, EdgepackError, InvalidInputError
from edgepack.signing import ProducerSigner

DEFAULT_SEGMENT_SIZE = 1024 * 1024
MIN_AGENT_VERSION = "0.1.0"
_ARCHES = ("x86_64", "aarch64", "any")


@dataclass(frozen=True)
class PackResult:
    """What :func:`pack` wrote."""

    path: Path
    info: Any  # BundleInfo; typed loosely to avoid an import cycle with the reader
    size: int
    payload_size: int


@dataclass(frozen=True)
class _SourceFile:
    path: str
    source: Path
    size: int


def collect_payload(model_dir: Path) -> list[_SourceFile]:
    """List the regular files under ``model_dir`` (sorted), refusing links and special files."""
    if not model_dir.is_dir():
        raise InvalidInputError(
            f"{model_dir} is not a directory", hint="pass the directory holding model.onnx"
        )
    found: list[_SourceFile] = []
    for root, dirs, files in os.walk(model_dir, followlinks=False):
        base = Path(root)
        for name in list(dirs):
            if (base / name).is_symlink():
                raise InvalidInputError(
                    f"{base / name} is a symbolic link; bundles carry regular files only"
                )
        for name in files:
            full = base / name
            info = full.lstat()
            if not stat.S_ISREG(info.st_mode):
                raise InvalidInputError(
                    f"{full} is not a regular file (link or special file); remove it"
                )
            if info.st_nlink > 1:  # its other name may be any file: devices refuse these too
                raise InvalidInputError(
                    f"{full} is a hard link ({info.st_nlink} names); copy the file instead"
                )
            rel = full.relative_to(model_dir).as_posix()
            try:
                check_payload_path(rel)
            except EdgepackError as exc:
                raise InvalidInputError(f"cannot pack {full}: {exc.message}") from None
            found.append(_SourceFile(rel, full, info.st_size))
    found.sort(key=lambda f: f.path)
    if not found:
        raise InvalidInputError(f"{model_dir} holds no files")
    _check_models_as_devices_will(model_dir, [f.path for f in found if f.path.endswith(".onnx")])
    return found


def _check_models_as_devices_will(model_dir: Path, models: Sequence[str]) -> None:
    """Refuse, at pack time, external data every device would refuse (absolute, ``..``,
    outside the folder): the agent's own check, so the two can never disagree."""
    from device_agent.safeload import check_model

    for rel in models:
        try:
            check_model(model_dir, rel)
        except EdgepackError as exc:
            raise InvalidInputError(f"cannot pack {rel}: {exc.message}") from None


class _PayloadReader:
    """Reads the concatenated payload files segment by segment, reporting per-file pieces."""

    def __init__(self, files: Sequence[_SourceFile]) -> None:
        self._files = list(files)
        self._index = 0
        self._handle: io.BufferedReader | None = None
        self._remaining = 0
        self.hashers = [hashlib.sha256() for _ in files]

    def fill(self, buffer: bytearray) -> tuple[int, list[tuple[int, memoryview]]]:
        """Fill ``buffer`` as far as the payload goes; return the length and (file index, slice) pieces."""
        view = memoryview(buffer)
        filled = 0
        pieces: list[tuple[int, memoryview]] = []
        while filled < len(buffer) and self._index < len(self._files):
            if self._handle is None:
                self._handle = open(self._files[self._index].source, "rb")  # noqa: SIM115 - closed below
                self._remaining = self._files[self._index].size
            want = min(len(buffer) - filled, self._remaining)
            got = self._handle.readinto(view[filled : filled + want]) if want else 0
            if want and not got:
                raise InvalidInputError(
                    f"{self._files[self._index].source} shrank while it was being packed"
                )
            pieces.append((self._index, view[filled : filled + got]))
            filled += got
            self._remaining -= got
            if self._remaining == 0:
                self._handle.close()
                self._handle = None
                self._index += 1
        return filled, pieces

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def pack(
    model_dir: Path,
    out_dir: Path,
    *,
    name: str,
    version: str,
    recipients: Sequence[x25519.X25519PublicKey],
    signer: ProducerSigner,
    profile: str | None = None,
    architectures: Sequence[str] = (),
    model_info: Mapping[str, Any] | None = None,
    quantization: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    health: Mapping[str, Any] | None = None,
    monitoring: Mapping[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    min_agent_version: str = MIN_AGENT_VERSION,
    durable: bool = False,
) -> PackResult:
    """Pack ``model_dir`` into ``out_dir/NAME-VERSION-PROFILE.epk``: encrypted for ``recipients``, signed by ``signer``.

    Nothing is left in ``out_dir`` if packing fails: the bundle is written to a
    temporary file and renamed into place. ``durable`` also fsyncs it before
    the rename (slower on large models; a bundle torn by a crash without it is
    still caught by every reader, since its digests and signature fail).
    ``monitoring`` is the model's reference profile (:func:`edgepack.monitoring.build_reference`),
    signed with the rest of the metadata; None records none.
    """
    from edgepack.bundle.reader import read_info

    check_name(name)
    check_version(version)
    versions.parse(min_agent_version, "min_agent_version")  # the agent compares by PEP 440
    if profile is not None:
        check_profile(profile)
    arches = sorted(set(architectures)) or ["any"]
    if any(a not in _ARCHES for a in arches):
        raise InvalidInputError(
            f"unknown architecture in {arches}", hint=f"use one of {list(_ARCHES)}"
        )
    if not recipients:
        raise InvalidInputError(
            "a bundle needs at least one recipient", hint="pass --recipient PUB"
        )
    files = collect_payload(model_dir)
    model = dict(model_info or {"path": "model.onnx"})
    if model.get("path") not in {f.path for f in files}:
        raise InvalidInputError(
            f"{model_dir} has no {model.get('path')!r}",
            hint="the model directory must hold model.onnx",
        )
    if monitoring is not None:
        try:
            check_monitoring(dict(monitoring))
        except BundleFormatError as exc:
            raise InvalidInputError(exc.message) from None
    if health is not None and health.get("file") not in {f.path for f in files}:
        raise InvalidInputError(f"the health set file {health.get('file')!r} is not in {model_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / bundle_file_name(name, version, profile)

    content_key = new_content_key()
    header = EncryptionHeader(segment_size, new_nonce_prefix(), ())
    info = hpke_info(name, version, profile, header)
    header = EncryptionHeader(
        segment_size, header.nonce_prefix, tuple(wrap_key(content_key, r, info) for r in recipients)
    )
    encryption_bytes = header.to_bytes()
    payload_size = sum(f.size for f in files)

    fd, tmp_name = tempfile.mkstemp(dir=out_dir, prefix=f".{final.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o644)  # a bundle is public: its payload is encrypted
        with os.fdopen(fd, "wb", buffering=0) as raw:
            _write_member(raw, META_ENCRYPTION, encryption_bytes)
            raw.write(
                _container.member_header(PAYLOAD, ciphertext_size(payload_size, segment_size))
            )
            digests = _write_payload(raw, files, content_key, header, payload_size, progress)
            manifest = [
                {"path": f.path, "sha256": digests[i], "size": f.size, "type": "file"}
                for i, f in enumerate(files)
            ]
            document = {
                "architectures": arches,
                "created_by": f"edgepack {__version__}",
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "health": dict(health) if health is not None else None,
                "min_agent_version": min_agent_version,
                "model": model,
                "monitoring": dict(monitoring) if monitoring is not None else None,
                "name": name,
                "payload": {"files": manifest, "size": payload_size},
                "profile": profile,
                "provenance": dict(provenance) if provenance is not None else None,
                "quantization": dict(quantization) if quantization is not None else None,
                "version": version,
            }
            bundle_bytes = canonical_json(document)
            _write_member(raw, META_BUNDLE, bundle_bytes)
            signed = {f.path: digests[i] for i, f in enumerate(files)}
            signed[META_BUNDLE] = hashlib.sha256(bundle_bytes).hexdigest()
            _write_member(raw, META_SIGNATURE, signer.sign_manifest(name, signed))
            raw.write(_container.end_of_archive())
            if durable:
                os.fsync(raw.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return PackResult(final, read_info(final), final.stat().st_size, payload_size)


def _write_member(raw: BinaryIO, name: str, data: bytes) -> None:
    raw.write(_container.member_header(name, len(data)))
    raw.write(data)
    raw.write(bytes(_container.padding(len(data))))


def _write_payload(
    raw: BinaryIO,
    files: Sequence[_SourceFile],
    content_key: bytes,
    header: EncryptionHeader,
    payload_size: int,
    progress: Callable[[int], None] | None,
) -> list[str]:
    """Stream the payload: read, hash (worker thread) and seal (this thread), double-buffered."""
    seg = header.segment_size
    total_segments = segment_count(payload_size, seg)
    sealer = StreamSealer(content_key, header.nonce_prefix)
    source = _PayloadReader(files)
    buffers = [bytearray(seg), bytearray(seg)]
    out = bytearray(seg + 16)
    pending: list[Future[None] | None] = [None, None]
    written = 0
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgepack-hash") as hasher:
            for index in range(total_segments):
                slot = index % 2
                previous = pending[slot]
                if previous is not None:
                    previous.result()
                length, pieces = source.fill(buffers[slot])
                pending[slot] = hasher.submit(hash_pieces, source.hashers, pieces)
                last = index == total_segments - 1
                raw.write(sealer.seal(memoryview(buffers[slot])[:length], out, last=last))
                written += length
                if progress is not None:
                    progress(length)
            for future in pending:
                if future is not None:
                    future.result()
    finally:
        source.close()
    if written != payload_size:
        raise InvalidInputError("a model file changed size while it was being packed; try again")
    raw.write(bytes(_container.padding(ciphertext_size(payload_size, seg))))
    return [h.hexdigest() for h in source.hashers]
