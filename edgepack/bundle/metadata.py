"""Bundle metadata (``meta/bundle.json`` and ``meta/encryption.json``): build, serialise, validate.

Both documents are canonical JSON (sorted keys, two-space indent, UTF-8,
trailing newline) so the same inputs give the same bytes. ``bundle.json`` is
covered by the producer signature and holds no secret; ``encryption.json``
holds the wrapped content keys and stream parameters and may be rewritten
when a bundle is re-encrypted for new recipients without breaking the
signature.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgepack.bundle._monitoring import check_monitoring
from edgepack.crypto import HPKE_SUITE_NAME, NONCE_PREFIX_SIZE, STREAM_SUITE_NAME, WrappedKey
from edgepack.errors import BundleFormatError, InvalidInputError

FORMAT = "edgepack-bundle"
FORMAT_VERSION = 2
"""What :func:`~edgepack.bundle.pack` writes; v2 added the ``monitoring`` field."""
SUPPORTED_VERSIONS = (1, 2)

META_BUNDLE = "meta/bundle.json"
META_ENCRYPTION = "meta/encryption.json"
META_SIGNATURE = "meta/signature.sigstore.json"
PAYLOAD = "payload.enc"
MEMBER_ORDER = (META_ENCRYPTION, PAYLOAD, META_BUNDLE, META_SIGNATURE)

NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$")
PROFILE_RE = re.compile(r"^[a-z0-9](?:[a-z0-9_-]{0,62}[a-z0-9])?$")
VERSION_RE = re.compile(r"^[0-9A-Za-z](?:[0-9A-Za-z.+_-]{0,62}[0-9A-Za-z])?$")
ARCHITECTURES = ("x86_64", "aarch64", "any")
_PATH_COMPONENT_RE = re.compile(r"^[A-Za-z0-9._+-]+$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Limits:
    """Every size and count bound the reader enforces, in one place."""

    max_bundle_json: int = 16 * 1024 * 1024
    max_encryption_json: int = 32 * 1024 * 1024
    max_signature: int = 4 * 1024 * 1024
    max_files: int = 10_000
    max_recipients: int = 100_000
    max_path_length: int = 255
    min_segment_size: int = 4 * 1024
    max_segment_size: int = 16 * 1024 * 1024
    max_json_depth: int = 64


DEFAULT_LIMITS = Limits()


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 overflows to infinity
        raise ValueError(f"{text} is not a finite number")
    return value


def load_json(data: bytes, what: str, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Parse strict JSON metadata: UTF-8, finite numbers, Unicode strings, bounded nesting.

    Python's ``json`` also accepts NaN and Infinity, numbers that overflow to
    infinity and escaped lone surrogates (text no UTF-8 writer can write back);
    a bundle's canonical JSON holds none of these, so a document that does is
    refused here with one clear error instead of failing later.
    """
    try:
        doc = json.loads(
            data.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float
        )
    except (UnicodeDecodeError, ValueError, RecursionError):
        # ValueError: JSONDecodeError, NaN/Infinity, integers over Python's digit limit.
        raise BundleFormatError(f"{what} is not valid JSON") from None
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > limits.max_json_depth:
                raise BundleFormatError(f"{what} is nested too deeply")
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise BundleFormatError(f"{what} holds text that is not Unicode") from None
    return doc


def canonical_json(document: Mapping[str, Any]) -> bytes:
    """Deterministic JSON bytes: sorted keys, fixed indent, trailing newline."""
    return (json.dumps(document, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()


def check_name(name: str) -> str:
    """A model name: lowercase letters, digits and dashes (like a snap name)."""
    if not NAME_RE.fullmatch(name):
        raise InvalidInputError(
            f"invalid model name {name!r}",
            hint="use lowercase letters, digits and dashes, up to 64 characters",
        )
    return name


def check_profile(profile: str) -> str:
    """A hardware profile name: lowercase letters, digits, dashes and underscores."""
    if not PROFILE_RE.fullmatch(profile):
        raise InvalidInputError(f"invalid hardware profile name {profile!r}")
    return profile


def check_version(version: str) -> str:
    """A release version: letters, digits and ``.+_-``, starting and ending alphanumeric."""
    if not VERSION_RE.fullmatch(version):
        raise InvalidInputError(
            f"invalid version {version!r}", hint="use e.g. 1.2.0 or 2024.05.1-rc1"
        )
    return version


def check_payload_path(path: str, limits: Limits = DEFAULT_LIMITS) -> str:
    """A payload file path: relative, normalised, no links or parent steps, safe characters."""
    if not path or len(path) > limits.max_path_length:
        raise BundleFormatError(f"payload path {path[:80]!r} is empty or too long")
    if path.startswith("/"):
        raise BundleFormatError(f"payload path {path!r} is absolute")
    parts = path.split("/")
    if ".." in parts:
        raise BundleFormatError(f"payload path {path!r} contains '..'")
    for part in parts:
        if part in ("", ".") or not _PATH_COMPONENT_RE.fullmatch(part):
            raise BundleFormatError(
                f"payload path {path!r} is not a normalised relative path of safe characters"
            )
    if parts[0] == "meta":
        raise BundleFormatError(f"payload path {path!r} may not live under meta/")
    return path


@dataclass(frozen=True)
class PayloadFile:
    """One entry of the payload manifest."""

    path: str
    size: int
    sha256: str


def _require(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in doc:
        raise BundleFormatError(f"{where}: missing field {key!r}")
    value = doc[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BundleFormatError(f"{where}: field {key!r} has the wrong type")
    return value


def parse_manifest(payload: Any, limits: Limits = DEFAULT_LIMITS) -> list[PayloadFile]:
    """Validate the payload manifest: safe paths, no duplicates or conflicts, bounded counts."""
    if not isinstance(payload, dict):
        raise BundleFormatError("meta/bundle.json: 'payload' must be an object")
    files = _require(payload, "files", list, "payload")
    if len(files) > limits.max_files:
        raise BundleFormatError(
            f"the payload manifest lists too many files ({len(files)} > {limits.max_files})"
        )
    if not files:
        raise BundleFormatError("the payload manifest is empty")
    result: list[PayloadFile] = []
    seen: set[str] = set()
    for entry in files:
        if not isinstance(entry, dict):
            raise BundleFormatError("payload manifest entries must be objects")
        kind = entry.get("type", "file")
        path = check_payload_path(_require(entry, "path", str, "payload entry"), limits)
        if kind != "file":
            raise BundleFormatError(
                f"payload entry {path!r} is a {kind!r}; bundles carry regular files only"
            )
        if path in seen:
            raise BundleFormatError(f"duplicate payload entry {path!r}")
        seen.add(path)
        size = _require(entry, "size", int, f"payload entry {path!r}")
        digest = _require(entry, "sha256", str, f"payload entry {path!r}")
        if size < 0 or not _HEX64.fullmatch(digest):
            raise BundleFormatError(f"payload entry {path!r} has a bad size or digest")
        result.append(PayloadFile(path, size, digest))
    for item in result:
        parts = item.path.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in seen:
                raise BundleFormatError(
                    f"payload entry {item.path!r} conflicts with a file of the same name"
                )
    total = _require(payload, "size", int, "payload")
    if total != sum(f.size for f in result):
        raise BundleFormatError("the payload manifest's total size does not add up")
    if [f.path for f in result] != sorted(seen):
        raise BundleFormatError("the payload manifest is not sorted by path")
    return result


def parse_bundle_json(
    data: bytes, limits: Limits = DEFAULT_LIMITS
) -> tuple[dict[str, Any], list[PayloadFile]]:
    """Parse and validate ``meta/bundle.json``; return the document and its manifest."""
    doc = load_json(data, META_BUNDLE, limits)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BundleFormatError("meta/bundle.json is not edgepack bundle metadata")
    version = doc.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise BundleFormatError(
            f"bundle format version {version!r} is not supported by this edgepack",
            hint=f"this edgepack reads versions {list(SUPPORTED_VERSIONS)}; upgrade it",
        )
    try:
        check_name(_require(doc, "name", str, "meta/bundle.json"))
        check_version(_require(doc, "version", str, "meta/bundle.json"))
        profile = doc.get("profile")
        if profile is not None and (
            not isinstance(profile, str) or not PROFILE_RE.fullmatch(profile)
        ):
            raise BundleFormatError("meta/bundle.json: bad profile name")
    except InvalidInputError as exc:
        raise BundleFormatError(f"meta/bundle.json: {exc.message}") from None
    arches = _require(doc, "architectures", list, "meta/bundle.json")
    if not arches or any(a not in ARCHITECTURES for a in arches):
        raise BundleFormatError("meta/bundle.json: bad architectures")
    model = _require(doc, "model", dict, "meta/bundle.json")
    model_path = check_payload_path(_require(model, "path", str, "model"), limits)
    manifest = parse_manifest(doc.get("payload"), limits)
    if model_path not in {f.path for f in manifest}:
        raise BundleFormatError(f"the model file {model_path!r} is not in the payload manifest")
    for key in ("quantization", "provenance", "health"):
        if doc.get(key) is not None and not isinstance(doc[key], dict):
            raise BundleFormatError(f"meta/bundle.json: {key!r} must be an object or null")
    _require(doc, "min_agent_version", str, "meta/bundle.json")
    if version == 1 and "monitoring" in doc:
        raise BundleFormatError("meta/bundle.json: format 1 has no 'monitoring' field")
    if version >= 2:
        if "monitoring" not in doc:
            raise BundleFormatError("meta/bundle.json: missing field 'monitoring'")
        if doc["monitoring"] is not None:
            check_monitoring(doc["monitoring"])
    return doc, manifest


@dataclass(frozen=True)
class EncryptionHeader:
    """``meta/encryption.json``: the stream parameters and the wrapped content keys."""

    segment_size: int
    nonce_prefix: bytes
    recipients: tuple[WrappedKey, ...]

    def to_bytes(self) -> bytes:
        """Canonical bytes; recipients sorted by key id so the order of ``--recipient`` does not matter."""
        return canonical_json(
            {
                "format_version": 1,
                "kem": HPKE_SUITE_NAME,
                "nonce_prefix": self.nonce_prefix.hex(),
                "recipients": [
                    {"key_id": r.key_id, "sealed": base64.b64encode(r.sealed).decode()}
                    for r in sorted(self.recipients, key=lambda r: r.key_id)
                ],
                "scheme": STREAM_SUITE_NAME,
                "segment_size": self.segment_size,
            }
        )


def parse_encryption_json(data: bytes, limits: Limits = DEFAULT_LIMITS) -> EncryptionHeader:
    """Parse and validate ``meta/encryption.json``."""
    doc = load_json(data, META_ENCRYPTION, limits)
    if not isinstance(doc, dict) or doc.get("format_version") != 1:
        raise BundleFormatError("meta/encryption.json has an unsupported version")
    if doc.get("scheme") != STREAM_SUITE_NAME or doc.get("kem") != HPKE_SUITE_NAME:
        raise BundleFormatError("meta/encryption.json names an unsupported encryption scheme")
    segment_size = _require(doc, "segment_size", int, "meta/encryption.json")
    if not limits.min_segment_size <= segment_size <= limits.max_segment_size:
        raise BundleFormatError("meta/encryption.json: segment size out of bounds")
    try:
        prefix = bytes.fromhex(_require(doc, "nonce_prefix", str, "meta/encryption.json"))
    except ValueError:
        raise BundleFormatError("meta/encryption.json: bad nonce prefix") from None
    if len(prefix) != NONCE_PREFIX_SIZE:
        raise BundleFormatError("meta/encryption.json: bad nonce prefix")
    recipients = _require(doc, "recipients", list, "meta/encryption.json")
    if not recipients or len(recipients) > limits.max_recipients:
        raise BundleFormatError("meta/encryption.json: no recipients, or too many")
    wrapped: list[WrappedKey] = []
    try:
        for entry in recipients:
            wrapped.append(
                WrappedKey(str(entry["key_id"]), base64.b64decode(entry["sealed"], validate=True))
            )
    except (KeyError, TypeError, ValueError):
        raise BundleFormatError("meta/encryption.json: malformed recipient entry") from None
    return EncryptionHeader(segment_size, prefix, tuple(wrapped))


def hpke_info(name: str, version: str, profile: str | None, header: EncryptionHeader) -> bytes:
    """HPKE ``info``: binds a wrapped key to the bundle's identity and stream parameters."""
    identity = {
        "name": name,
        "nonce_prefix": header.nonce_prefix.hex(),
        "profile": profile,
        "segment_size": header.segment_size,
        "version": version,
    }
    return (
        b"edgepack-bundle-v1\x00"
        + json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()
    )


def bundle_file_name(name: str, version: str, profile: str | None) -> str:
    """The conventional file name of a bundle: ``NAME-VERSION-PROFILE.epk``."""
    return f"{name}-{version}-{profile or 'any'}.epk"
