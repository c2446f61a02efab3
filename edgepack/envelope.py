"""Per-device key envelopes and the repository's list of revoked devices.

A release's content key is wrapped in the bundle (``meta/encryption.json``) for
group or publisher keys; an *envelope* wraps the same key for one device, as a
separate small TUF target ``keys/NAME/VERSION/DEVICE_ID.json`` signed by the
operators (see docs/repository.md, "Per-device key envelopes and revocation").
The device looks its own envelope up, so a fleet of any size can have per-device
keys, and a revoked device simply gets no envelope for the next release.

The envelope is canonical JSON (sorted keys, no spaces, trailing newline)::

    {"bundle_sha256": HEX64, "device_id": "dev-…", "format": "edgepack-key-envelope",
     "format_version": 1, "key_id": HEX32, "name": …, "profile": … | null,
     "sealed": BASE64, "version": …}

``sealed`` is the HPKE wrap (:func:`edgepack.crypto.wrap_key`) of the content key to
the device's recipient public key with the bundle's own HPKE ``info``
(:func:`edgepack.bundle.metadata.hpke_info`), so it opens only for that bundle's
name, version, profile and stream parameters; ``key_id`` is
:func:`edgepack.crypto.recipient_key_id` of that public key.

This module uses the standard library, ``cryptography`` and the bundle's metadata
helpers only: the device agent imports it to read envelopes.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import x25519

from edgepack.bundle.metadata import (
    NAME_RE,
    PROFILE_RE,
    VERSION_RE,
    Limits,
    load_json,
)
from edgepack.crypto import KEY_SIZE, TAG_SIZE, recipient_key_id, wrap_key
from edgepack.errors import BundleFormatError, InvalidInputError

FORMAT = "edgepack-key-envelope"
FORMAT_VERSION = 1
REVOKED_FORMAT = "edgepack-revoked-devices"
REVOKED_PATH = "keys/revoked.json"
"""The signed list of revoked devices, a target of the envelopes role."""
MAX_ENVELOPE_BYTES = 4096
"""An envelope is about 450 bytes; the device refuses a target larger than this."""
MAX_REVOKED_BYTES = 64 * 1024 * 1024
SEALED_SIZE = 32 + KEY_SIZE + TAG_SIZE
"""HPKE X25519 encapsulated key, then the content key sealed with AES-256-GCM."""
DEVICE_ID_RE = re.compile(r"^dev-[0-9a-f]{20}$")
"""The shape of :func:`edgepack.fleetreport.device_id_for`'s ids (also path-safe)."""
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_KEYS = frozenset(
    {
        "format",
        "format_version",
        "name",
        "version",
        "profile",
        "bundle_sha256",
        "device_id",
        "key_id",
        "sealed",
    }
)
_SMALL = Limits(max_json_depth=4)


def check_device_id(device_id: str) -> str:
    """A device id as enrolment derives it (``dev-`` and 20 hex digits), or a clear error."""
    if not isinstance(device_id, str) or not DEVICE_ID_RE.fullmatch(device_id):
        raise InvalidInputError(
            f"invalid device id {str(device_id)[:80]!r}",
            hint="device ids look like dev-0123456789abcdef0123 (see `edgepack fleet devices`)",
        )
    return device_id


def envelope_target_path(name: str, version: str, device_id: str) -> str:
    """``keys/NAME/VERSION/DEVICE_ID.json``: where a device finds its envelope for a release."""
    if not NAME_RE.fullmatch(name) or not VERSION_RE.fullmatch(version):
        raise InvalidInputError(f"invalid model name or version {name!r} {version!r}")
    return f"keys/{name}/{version}/{check_device_id(device_id)}.json"


def _canonical(document: Mapping[str, Any]) -> bytes:
    return (
        json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"
    ).encode("utf-8")


@dataclass(frozen=True)
class Envelope:
    """One device's wrap of one bundle's content key."""

    name: str
    version: str
    profile: str | None
    bundle_sha256: str
    device_id: str
    key_id: str
    sealed: bytes

    @property
    def target_path(self) -> str:
        """The TUF target path this envelope is published under."""
        return envelope_target_path(self.name, self.version, self.device_id)

    def to_bytes(self) -> bytes:
        """The canonical bytes (what is published and hashed in TUF metadata)."""
        return _canonical(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "name": self.name,
                "version": self.version,
                "profile": self.profile,
                "bundle_sha256": self.bundle_sha256,
                "device_id": self.device_id,
                "key_id": self.key_id,
                "sealed": base64.b64encode(self.sealed).decode("ascii"),
            }
        )


def make_envelope(
    content_key: bytes,
    recipient: x25519.X25519PublicKey,
    *,
    name: str,
    version: str,
    profile: str | None,
    bundle_sha256: str,
    device_id: str,
    info: bytes,
) -> Envelope:
    """Seal ``content_key`` to one device's recipient key, bound by ``info`` to its bundle."""
    if len(content_key) != KEY_SIZE:
        raise ValueError("a content key is 32 bytes")
    envelope = Envelope(
        name=name,
        version=version,
        profile=profile,
        bundle_sha256=bundle_sha256,
        device_id=device_id,
        key_id=recipient_key_id(recipient),
        sealed=wrap_key(content_key, recipient, info).sealed,
    )
    _check_fields(envelope)
    return envelope


def _check_fields(envelope: Envelope) -> None:
    if not NAME_RE.fullmatch(envelope.name) or not VERSION_RE.fullmatch(envelope.version):
        raise BundleFormatError("the key envelope names an invalid model or version")
    if envelope.profile is not None and not PROFILE_RE.fullmatch(envelope.profile):
        raise BundleFormatError("the key envelope names an invalid profile")
    if not _HEX64.fullmatch(envelope.bundle_sha256):
        raise BundleFormatError("the key envelope's bundle_sha256 is not 64 hex digits")
    if not DEVICE_ID_RE.fullmatch(envelope.device_id):
        raise BundleFormatError("the key envelope's device_id is not a device id")
    if not _HEX32.fullmatch(envelope.key_id):
        raise BundleFormatError("the key envelope's key_id is not 32 hex digits")
    if len(envelope.sealed) != SEALED_SIZE:
        raise BundleFormatError("the key envelope's sealed key has the wrong size")


def _no_duplicates(data: bytes, what: str) -> None:
    """Refuse an object with a key given twice (readers would disagree on which counts)."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in items]
        if len(set(keys)) != len(keys):
            raise BundleFormatError(f"{what} has a field given twice")
        return dict(items)

    json.loads(data, object_pairs_hook=pairs)


def parse_envelope(data: bytes) -> Envelope:
    """Parse and check an envelope: size, strict JSON, exactly its fields, their shapes.

    Raises :class:`~edgepack.errors.BundleFormatError` (one line) on anything else.
    """
    if len(data) > MAX_ENVELOPE_BYTES:
        raise BundleFormatError(
            f"the key envelope is {len(data)} bytes, above the limit of {MAX_ENVELOPE_BYTES}"
        )
    doc = load_json(data, "the key envelope", _SMALL)
    _no_duplicates(data, "the key envelope")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BundleFormatError("not an edgepack key envelope")
    if doc.get("format_version") != FORMAT_VERSION or isinstance(doc.get("format_version"), bool):
        raise BundleFormatError(
            f"key envelope format version {doc.get('format_version')!r} is not supported",
            hint=f"this edgepack reads version {FORMAT_VERSION}; upgrade it",
        )
    if set(doc) != _KEYS:
        missing = sorted(_KEYS - set(doc))
        extra = sorted(set(doc) - _KEYS)
        raise BundleFormatError(
            f"the key envelope has missing fields {missing} or unknown fields {extra}"
        )
    for key in ("name", "version", "bundle_sha256", "device_id", "key_id", "sealed"):
        if not isinstance(doc[key], str):
            raise BundleFormatError(f"the key envelope's {key!r} is not a string")
    if doc["profile"] is not None and not isinstance(doc["profile"], str):
        raise BundleFormatError("the key envelope's 'profile' is not a string or null")
    try:
        sealed = base64.b64decode(doc["sealed"], validate=True)
    except (binascii.Error, ValueError):
        raise BundleFormatError("the key envelope's sealed key is not base64") from None
    envelope = Envelope(
        name=doc["name"],
        version=doc["version"],
        profile=doc["profile"],
        bundle_sha256=doc["bundle_sha256"],
        device_id=doc["device_id"],
        key_id=doc["key_id"],
        sealed=sealed,
    )
    _check_fields(envelope)
    return envelope


# ----------------------------------------------------------------------------- revocations


@dataclass(frozen=True)
class Revocation:
    """One revoked device: when (UTC, ISO 8601 ``…Z``) and why."""

    device_id: str
    time: str
    reason: str


def revoked_to_bytes(revoked: Mapping[str, Revocation]) -> bytes:
    """The canonical ``keys/revoked.json``: every revoked device, sorted by id."""
    return _canonical(
        {
            "format": REVOKED_FORMAT,
            "format_version": FORMAT_VERSION,
            "devices": [
                {"device_id": r.device_id, "time": r.time, "reason": r.reason}
                for _, r in sorted(revoked.items())
            ],
        }
    )


def parse_revoked(data: bytes) -> dict[str, Revocation]:
    """Parse ``keys/revoked.json``: device id → its revocation."""
    if len(data) > MAX_REVOKED_BYTES:
        raise BundleFormatError("the list of revoked devices is too large")
    doc = load_json(data, "the list of revoked devices", _SMALL)
    _no_duplicates(data, "the list of revoked devices")
    if (
        not isinstance(doc, dict)
        or doc.get("format") != REVOKED_FORMAT
        or doc.get("format_version") != FORMAT_VERSION
        or not isinstance(doc.get("devices"), list)
    ):
        raise BundleFormatError("not an edgepack list of revoked devices (format 1)")
    out: dict[str, Revocation] = {}
    for entry in doc["devices"]:
        if not isinstance(entry, dict) or set(entry) != {"device_id", "time", "reason"}:
            raise BundleFormatError("a malformed entry in the list of revoked devices")
        if not all(isinstance(entry[k], str) for k in entry) or not DEVICE_ID_RE.fullmatch(
            entry["device_id"]
        ):
            raise BundleFormatError("a malformed entry in the list of revoked devices")
        out[entry["device_id"]] = Revocation(entry["device_id"], entry["time"], entry["reason"])
    return out
