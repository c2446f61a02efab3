"""From a report's bytes to a stored report or a refusal: the service's one pure pipeline.

:func:`ingest` takes the HTTP body, the ``Edgepack-Signature`` header and a store,
and either stores the report (returning :class:`Accepted`) or raises
:class:`~edgepack.fleet.store.RefusedError` with the HTTP status to answer. The
checks run cheapest and least trusting first, so nothing of an unverified report
is believed beyond the device id it claims (needed to find the key to check):

* 413 ``too-large``: more than :data:`~edgepack.fleetreport.MAX_REPORT_BYTES`
  (checked before parsing);
* 401 ``unsigned``: no signature header;
* 400 ``malformed``: not strict JSON, no valid device id, a bad field;
* 403 ``unregistered``: no operator registered the claimed device;
* 403 ``revoked``: the device was revoked;
* 401 ``bad-signature``: not signed by the *registered* identity of the device;
* 422 ``model-not-followed``: names a model the device was not registered to follow;
* 409 ``replayed``: counter not greater than the last stored (the store's atomic
  check, so two racing copies cannot both pass);
* 503 ``store-unavailable``: the database failed; nothing was stored.

A refused report is never stored: every check but the counter runs before the
store is written, and the counter check is the store's own transaction.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from edgepack import fleetreport
from edgepack.errors import InvalidInputError
from edgepack.fleet.store import Device, FleetStore, RefusedError, StoreUnavailableError


@dataclass(frozen=True)
class Accepted:
    """A report the store has committed."""

    device_id: str
    counter: int
    report: dict[str, Any]


class IdentityCache:
    """Registered devices' identity keys and followed models, kept for ``ttl_s``.

    It saves the service one database round trip per report. It is safe because a
    device id is derived from its identity key, so the key of an id never changes;
    revocation is not cached at all (the store's own ingest transaction refuses a
    revoked device, and the entry is dropped). Only the followed models may lag a
    re-registration by up to ``ttl_s``. Unknown devices are never cached.
    """

    def __init__(self, ttl_s: float = 10.0, size: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.size = size
        self._entries: dict[str, tuple[float, Device]] = {}
        self._lock = threading.Lock()

    def get(self, device_id: str) -> Device | None:
        """The cached registration, or None when absent or older than the bound."""
        with self._lock:
            entry = self._entries.get(device_id)
        if entry is None or time.monotonic() - entry[0] > self.ttl_s:
            return None
        return entry[1]

    def put(self, device: Device) -> None:
        """Remember a registered device (the oldest entry goes when full)."""
        with self._lock:
            if len(self._entries) >= self.size and device.device_id not in self._entries:
                del self._entries[next(iter(self._entries))]
            self._entries[device.device_id] = (time.monotonic(), device)

    def drop(self, device_id: str) -> None:
        """Forget a device (it was refused by the store)."""
        with self._lock:
            self._entries.pop(device_id, None)


def ingest(
    store: FleetStore,
    body: bytes,
    signature: str | None,
    *,
    now: float,
    cache: IdentityCache | None = None,
) -> Accepted:
    """Check ``body`` (signed by ``signature``) and store it; raise RefusedError otherwise.

    ``cache`` (optional) holds registered identities between reports.
    """
    if len(body) > fleetreport.MAX_REPORT_BYTES:
        raise RefusedError(
            413, "too-large", f"a report is at most {fleetreport.MAX_REPORT_BYTES} bytes"
        )
    if not signature or not signature.strip():
        raise RefusedError(
            401, "unsigned", f"the report has no {fleetreport.SIGNATURE_HEADER} header"
        )
    try:
        device_id = fleetreport.device_id_of(body)
    except InvalidInputError as exc:
        raise RefusedError(400, "malformed", exc.message) from None
    device = cache.get(device_id) if cache is not None else None
    if device is None:
        device = _registered(store, device_id)
        if cache is not None:
            cache.put(device)
    if not fleetreport.verify(device.identity, body, signature):
        raise RefusedError(
            401, "bad-signature", f"the report is not signed by {device_id}'s registered key"
        )
    try:
        report = fleetreport.parse_report(body)
    except InvalidInputError as exc:
        raise RefusedError(400, "malformed", exc.message) from None
    foreign = sorted(set(report["models"]) - set(device.models))
    if foreign:
        raise RefusedError(
            422,
            "model-not-followed",
            f"{device_id} is not registered to follow {', '.join(foreign)}",
        )
    try:
        store.ingest(device_id, report["counter"], now, report, body)
    except StoreUnavailableError as exc:
        raise RefusedError(503, "store-unavailable", exc.message) from None
    except RefusedError as exc:
        if cache is not None and exc.code == 403:
            cache.drop(device_id)
        raise
    return Accepted(device_id, report["counter"], report)


def _registered(store: FleetStore, device_id: str) -> Device:
    """The device as registered, or the refusal for an unknown or revoked one."""
    try:
        device = store.device(device_id)
    except StoreUnavailableError as exc:
        raise RefusedError(503, "store-unavailable", exc.message) from None
    if device is None:
        raise RefusedError(403, "unregistered", f"{device_id} is not registered")
    if device.revoked_at is not None:
        raise RefusedError(403, "revoked", f"{device_id} was revoked")
    return device


def device_from_record(record: dict[str, Any], *, now: float) -> Device:
    """The :class:`Device` an operator registers from a checked enrolment record."""
    return Device(
        device_id=record["device_id"],
        identity=fleetreport.identity_raw(record),
        recipient=record["recipient"],
        models=tuple(record["models"]),
        channel=record["channel"],
        cohort=record["cohort"],
        profile=record["profile"],
        architecture=record["architecture"],
        registered_at=now,
    )


def device_view(device: Device) -> dict[str, Any]:
    """A device as JSON (the API's and the CLI's ``--json`` shape): no private data."""
    return {
        "device_id": device.device_id,
        "identity": "ed25519:" + device.identity.hex(),
        "recipient": device.recipient,
        "models": list(device.models),
        "channel": device.channel,
        "cohort": device.cohort,
        "profile": device.profile,
        "architecture": device.architecture,
        "registered_at": device.registered_at,
        "revoked_at": device.revoked_at,
        "revoked_reason": device.revoked_reason,
        "last_counter": device.last_counter,
        "last_seen": device.last_seen,
    }


def device_detail(store: FleetStore, device_id: str) -> dict[str, Any] | None:
    """A device's registration and its last report (``fleet show``, ``GET /v1/devices/ID``)."""
    device = store.device(device_id)
    if device is None:
        return None
    return {"device": device_view(device), "last_report": store.last_report(device_id)}
