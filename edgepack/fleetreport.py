"""The two documents a device sends its fleet: the enrolment record and the signed report.

Both are strict JSON (no duplicate keys, no NaN, bounded size) signed with the
device's Ed25519 identity key (``DATA/keys/identity.key``, made at enrolment, never
leaving the device). The device id is derived from that key's public bytes
(:func:`device_id_for`), so a record cannot claim another device's id.

* The **enrolment record** (``DATA/keys/enrolment.json``) is what an operator
  registers with ``edgepack fleet register RECORD``: the device id, its identity
  and recipient public keys, what it follows. Its signature proves the device
  holds the identity key; the operator's act of registering is the consent.
* A **report** is a small JSON object (see :data:`REPORT_KEYS` and
  :data:`MODEL_KEYS`) sent as the HTTP body of ``POST /v1/reports`` with the
  header ``Edgepack-Signature: ed25519 BASE64`` over the exact body bytes. Its
  ``counter`` grows with every report (the service refuses one that does not).

This module uses the standard library and ``cryptography`` only: the device agent
imports it to write, the fleet service to check, and both agree byte for byte.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from edgepack.errors import InvalidInputError

REPORT_FORMAT = "edgepack-report"
RECORD_FORMAT = "edgepack-enrolment"
FORMAT_VERSION = 1
SIGNATURE_HEADER = "Edgepack-Signature"
SIGNATURE_SCHEME = "ed25519"
MAX_REPORT_BYTES = 16 * 1024
"""The service refuses a larger report (413) before parsing it; the agent never sends one."""
MAX_RECORD_BYTES = 16 * 1024
MAX_MODELS = 32
MAX_TEXT = 300
"""Free text in a report (an error, a refusal's reason) is cut to this many characters."""
MAX_REFUSED = 8

REPORT_KEYS = {
    "format",
    "format_version",
    "device_id",
    "counter",
    "time",
    "agent_version",
    "profile",
    "architecture",
    "runtime",
    "models",
}
MODEL_KEYS = {
    "channel",
    "revision",
    "version",
    "cohort_bucket",
    "state",
    "pending",
    "last_action",
    "last_error",
    "refused",
    "health_latency_ms",
    "stale",
}
OPTIONAL_MODEL_KEYS = frozenset({"monitoring"})
"""May be absent (an agent without monitoring, or with it turned off) or null."""
MONITORING_KEYS = {
    "revision",
    "rows",
    "drift_psi",
    "max_feature_psi",
    "anomaly_rate",
    "mean_confidence",
    "alerts",
}
"""A model's ``monitoring`` entry: the last scored window of the running revision
(docs/monitoring.md); ``previous`` (optional, same keys but itself) is the revision that
ran before it on this device, for a canary comparison."""
MAX_ALERTS = 8
ALERT_KINDS = frozenset(
    {"drift", "feature-drift", "anomalies", "confidence", "output-drift", "canary"}
)
RECORD_KEYS = {
    "format",
    "format_version",
    "device_id",
    "identity",
    "recipient",
    "models",
    "channel",
    "cohort",
    "profile",
    "architecture",
    "agent_version",
    "signature",
}
_DEVICE_ID_RE = re.compile(r"dev-[0-9a-f]{20}")
_HEX_KEY_RE = re.compile(r"[0-9a-f]{64}")


def device_id_for(public_raw: bytes) -> str:
    """A stable id derived from the device's identity public key (same key, same id)."""
    return "dev-" + hashlib.sha256(b"edgepack-device-id\x00" + public_raw).hexdigest()[:20]


def canonical(document: Mapping[str, Any]) -> bytes:
    """The one byte form of a document: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def cut(text: object, limit: int = MAX_TEXT) -> str | None:
    """``text`` as a string of at most ``limit`` characters (None stays None)."""
    if text is None:
        return None
    s = str(text)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def sign(key: ed25519.Ed25519PrivateKey, body: bytes) -> str:
    """The ``Edgepack-Signature`` header value for ``body``."""
    return f"{SIGNATURE_SCHEME} {base64.b64encode(key.sign(body)).decode('ascii')}"


def verify(public_raw: bytes, body: bytes, header: str | None) -> bool:
    """Whether ``header`` is a valid Ed25519 signature of ``body`` by ``public_raw``."""
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    if scheme != SIGNATURE_SCHEME:
        return False
    try:
        signature = base64.b64decode(value.strip(), validate=True)
        ed25519.Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, body)
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True


def public_raw(key: ed25519.Ed25519PrivateKey) -> bytes:
    """The raw 32 public bytes of an identity key."""
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _strict_json(data: bytes, what: str, limit: int) -> dict[str, Any]:
    if len(data) > limit:
        raise InvalidInputError(f"{what} is larger than {limit} bytes")

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                raise InvalidInputError(f"{what} repeats the key {k!r}")
            out[k] = v
        return out

    def constant(name: str) -> None:
        raise InvalidInputError(f"{what} holds {name}, which is not JSON")

    try:
        raw = json.loads(data.decode("utf-8"), object_pairs_hook=pairs, parse_constant=constant)
    except UnicodeDecodeError:
        raise InvalidInputError(f"{what} is not UTF-8") from None
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, InvalidInputError):
            raise
        raise InvalidInputError(f"{what} is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidInputError(f"{what} is not a JSON object")
    return raw


def _keys(
    obj: Mapping[str, Any], wanted: set[str], where: str, optional: frozenset[str] = frozenset()
) -> None:
    missing = wanted - obj.keys()
    extra = obj.keys() - wanted - optional
    if missing:
        raise InvalidInputError(f"{where} lacks {', '.join(sorted(missing))}")
    if extra:
        raise InvalidInputError(f"{where} has unknown keys {', '.join(sorted(extra))}")


def _text(value: object, where: str, *, optional: bool = False, limit: int = MAX_TEXT) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or len(value) > limit:
        raise InvalidInputError(f"{where} must be a string of at most {limit} characters")


def _number(value: object, where: str, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInputError(f"{where} must be a finite number")
    if value < 0:
        raise InvalidInputError(f"{where} must not be negative")


def _monitoring(raw: object, where: str, *, nested: bool = False) -> None:
    if not isinstance(raw, dict):
        raise InvalidInputError(f"{where} must be an object or null")
    _keys(raw, MONITORING_KEYS, where, frozenset() if nested else frozenset({"previous"}))
    _text(raw["revision"], f"{where} revision", limit=128)
    rows = raw["rows"]
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise InvalidInputError(f"{where} rows must be a whole number")
    for key in ("drift_psi", "max_feature_psi", "anomaly_rate"):
        _number(raw[key], f"{where} {key}")
    _number(raw["mean_confidence"], f"{where} mean_confidence", optional=True)
    alerts = raw["alerts"]
    if (
        not isinstance(alerts, list)
        or len(alerts) > MAX_ALERTS
        or not all(a in ALERT_KINDS for a in alerts)
    ):
        raise InvalidInputError(
            f"{where} alerts must be a list of at most {MAX_ALERTS} alert kinds"
        )
    if not nested and raw.get("previous") is not None:
        _monitoring(raw["previous"], f"{where} previous", nested=True)


def device_id_of(data: bytes) -> str:
    """The ``device_id`` a report claims, read before its signature is checked.

    The service needs it to find the key to check the signature with; nothing
    else of an unverified report is trusted.
    """
    doc = _strict_json(data, "the report", MAX_REPORT_BYTES)
    device = doc.get("device_id")
    if not isinstance(device, str) or not _DEVICE_ID_RE.fullmatch(device):
        raise InvalidInputError("the report names no valid device_id")
    return device


def parse_report(data: bytes) -> dict[str, Any]:
    """A report's document, checked field by field; raises InvalidInputError."""
    doc = _strict_json(data, "the report", MAX_REPORT_BYTES)
    _keys(doc, REPORT_KEYS, "the report")
    if doc["format"] != REPORT_FORMAT:
        raise InvalidInputError(f"not a report: format is {doc['format']!r}")
    if doc["format_version"] != FORMAT_VERSION or isinstance(doc["format_version"], bool):
        raise InvalidInputError(f"unsupported report format_version {doc['format_version']!r}")
    if not isinstance(doc["device_id"], str) or not _DEVICE_ID_RE.fullmatch(doc["device_id"]):
        raise InvalidInputError("the report names no valid device_id")
    counter = doc["counter"]
    if isinstance(counter, bool) or not isinstance(counter, int) or not 0 < counter < 2**63:
        raise InvalidInputError("the report's counter must be a positive 64-bit integer")
    _number(doc["time"], "the report's time")
    for key in ("agent_version", "profile", "architecture"):
        _text(doc[key], f"the report's {key}", limit=64)
    runtime = doc["runtime"]
    if not isinstance(runtime, dict) or len(runtime) > 16:
        raise InvalidInputError("the report's runtime must be an object of at most 16 entries")
    for name, version in runtime.items():
        _text(name, "a runtime component's name", limit=64)
        _text(version, f"the runtime version of {name}", limit=64)
    models = doc["models"]
    if not isinstance(models, dict) or len(models) > MAX_MODELS:
        raise InvalidInputError(f"the report's models must be an object of at most {MAX_MODELS}")
    for name, entry in models.items():
        _text(name, "a model name", limit=64)
        where = f"the report's model {name!r}"
        if not isinstance(entry, dict):
            raise InvalidInputError(f"{where} is not an object")
        _keys(entry, MODEL_KEYS, where, OPTIONAL_MODEL_KEYS)
        if entry.get("monitoring") is not None:
            _monitoring(entry["monitoring"], f"{where} monitoring")
        for key in ("channel", "revision", "version", "state", "pending", "last_action"):
            _text(entry[key], f"{where} {key}", optional=key != "channel", limit=128)
        _text(entry["last_error"], f"{where} last_error", optional=True)
        _number(entry["cohort_bucket"], f"{where} cohort_bucket", optional=True)
        _number(entry["health_latency_ms"], f"{where} health_latency_ms", optional=True)
        if not isinstance(entry["stale"], bool):
            raise InvalidInputError(f"{where} stale must be true or false")
        refused = entry["refused"]
        if not isinstance(refused, dict) or len(refused) > MAX_REFUSED:
            raise InvalidInputError(f"{where} refused must be an object of at most {MAX_REFUSED}")
        for version, why in refused.items():
            _text(version, f"{where} refused version", limit=64)
            _text(why, f"{where} refusal reason")
    return doc


def record_body(record: Mapping[str, Any]) -> bytes:
    """The bytes an enrolment record's signature covers: the record without it."""
    return canonical({k: v for k, v in record.items() if k != "signature"})


def make_record(key: ed25519.Ed25519PrivateKey, fields: Mapping[str, Any]) -> dict[str, Any]:
    """An enrolment record of ``fields`` (all of :data:`RECORD_KEYS` but the three
    this sets: format, format_version, signature), signed by the identity key."""
    record = {"format": RECORD_FORMAT, "format_version": FORMAT_VERSION, **fields}
    record["signature"] = sign(key, record_body(record))
    return record


def parse_record(data: bytes) -> dict[str, Any]:
    """An enrolment record, checked: its fields, that its device id is its identity
    key's, and that the identity key signed it. Raises InvalidInputError."""
    record = _strict_json(data, "the enrolment record", MAX_RECORD_BYTES)
    _keys(record, RECORD_KEYS, "the enrolment record")
    if record["format"] != RECORD_FORMAT or record["format_version"] != FORMAT_VERSION:
        raise InvalidInputError(
            "not an edgepack enrolment record (format 1)",
            hint="give the DATA/keys/enrolment.json that `edgepack-agent enroll` wrote",
        )
    identity = record["identity"]
    if not isinstance(identity, str) or not identity.startswith("ed25519:"):
        raise InvalidInputError("the enrolment record's identity is not ed25519:HEX")
    hex_key = identity.removeprefix("ed25519:")
    if not _HEX_KEY_RE.fullmatch(hex_key):
        raise InvalidInputError("the enrolment record's identity is not 32 bytes of hex")
    raw = bytes.fromhex(hex_key)
    if record["device_id"] != device_id_for(raw):
        raise InvalidInputError("the enrolment record's device_id is not its identity key's")
    recipient = record["recipient"]
    if not isinstance(recipient, str) or (
        recipient and not re.fullmatch(r"x25519:[0-9a-f]{64}", recipient)
    ):
        raise InvalidInputError("the enrolment record's recipient is not x25519:HEX")
    models = record["models"]
    if not isinstance(models, list) or not models or len(models) > MAX_MODELS:
        raise InvalidInputError("the enrolment record's models must be a non-empty list")
    for name in models:
        _text(name, "a model name in the enrolment record", limit=64)
    for key in ("channel", "cohort", "profile", "architecture", "agent_version"):
        _text(record[key], f"the enrolment record's {key}", limit=64)
    if not verify(raw, record_body(record), record["signature"]):
        raise InvalidInputError(
            "the enrolment record's signature does not verify",
            hint="the record was changed after the device wrote it; take it from the device again",
        )
    return record


def identity_raw(record: Mapping[str, Any]) -> bytes:
    """The raw identity public key of a checked enrolment record."""
    return bytes.fromhex(str(record["identity"]).removeprefix("ed25519:"))
