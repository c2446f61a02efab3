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


def ingest(store: FleetStore, body: bytes, signature: str | None, *, now: float) -> Accepted:
    """Check ``body`` (signed by ``signature``) and store it; raise RefusedError otherwise."""
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
    device = _registered(store, device_id)
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
