"""The report pipeline against real stores (SQLite and PostgreSQL): what it takes and what it
refuses, with which status, and that nothing refused is ever stored.

``store`` (tests/fleet/conftest.py) is a fresh migrated store of each backend.
"""

from __future__ import annotations

import json
import time

import pytest

from edgepack import fleetreport
from edgepack.fleet import ingest
from edgepack.fleet.store import FleetStore, RefusedError
from tests.fleet._devices import FakeDevice, model_entry


def enrol(store: FleetStore, device: FakeDevice) -> None:
    """Register ``device`` as an operator would, from its enrolment record."""
    record = fleetreport.parse_record(device.record_bytes())
    assert store.register(ingest.device_from_record(record, now=time.time()))


def assert_nothing_stored(store: FleetStore, device: FakeDevice) -> None:
    """The store holds no report of ``device`` and its counter has not moved."""
    assert store.last_report(device.device_id) is None
    assert [s for s in store.states() if s.device_id == device.device_id] == []
    registered = store.device(device.device_id)
    if registered is not None:
        assert registered.last_counter == 0
        assert registered.last_seen is None


def refused(store: FleetStore, body: bytes, signature: str | None) -> RefusedError:
    """The refusal of ``body``; fails the test if it is accepted."""
    with pytest.raises(RefusedError) as info:
        ingest.ingest(store, body, signature, now=time.time())
    return info.value


def test_a_signed_report_of_a_registered_device_is_stored(store: FleetStore) -> None:
    device = FakeDevice()
    enrol(store, device)
    body = device.report()
    accepted = ingest.ingest(store, body, device.sign(body), now=1000.0)
    assert (accepted.device_id, accepted.counter) == (device.device_id, 1)
    assert store.last_report(device.device_id) == json.loads(body)
    (state,) = store.states()
    assert (state.model, state.version, state.state) == ("detector", "1.0.0", "running")
    assert store.device(device.device_id).last_counter == 1  # type: ignore[union-attr]


def test_oversized_is_refused_before_parsing(store: FleetStore) -> None:
    device = FakeDevice()
    enrol(store, device)
    entry = model_entry(last_error="x" * 300, refused={"0.9.0": "y" * 300})
    body = device.report({f"m{i}": entry for i in range(32)})
    assert len(body) > fleetreport.MAX_REPORT_BYTES
    error = refused(store, body, device.sign(body))
    assert (error.code, error.reason) == (413, "too-large")
    # Garbage too: the size is checked before anything parses it.
    error = refused(store, b"{" * (fleetreport.MAX_REPORT_BYTES + 1), "ed25519 AAAA")
    assert error.code == 413
    assert_nothing_stored(store, device)


def test_unsigned_is_refused(store: FleetStore) -> None:
    device = FakeDevice()
    enrol(store, device)
    body = device.report()
    for header in (None, "", "   "):
        error = refused(store, body, header)
        assert (error.code, error.reason) == (401, "unsigned")
    assert_nothing_stored(store, device)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x00\xff garbage",
        b"[1, 2, 3]",
        b'{"device_id": "not-a-device"}',
        b'{"device_id": NaN}',
    ],
    ids=["empty", "binary", "array", "bad-id", "nan"],
)
def test_garbage_is_malformed(store: FleetStore, body: bytes) -> None:
    device = FakeDevice()
    enrol(store, device)
    error = refused(store, body, device.sign(body))
    assert (error.code, error.reason) == (400, "malformed")
    assert_nothing_stored(store, device)


def test_a_truncated_report_is_malformed(store: FleetStore) -> None:
    device = FakeDevice()
    enrol(store, device)
    body = device.report()[:-40]
    error = refused(store, body, device.sign(body))
    assert (error.code, error.reason) == (400, "malformed")
    assert_nothing_stored(store, device)


def test_a_signed_report_with_a_bad_field_is_malformed(store: FleetStore) -> None:
    device = FakeDevice()
    enrol(store, device)
    doc = json.loads(device.report())
    doc["surprise"] = True
    body = fleetreport.canonical(doc)
    error = refused(store, body, device.sign(body))
    assert (error.code, error.reason) == (400, "malformed")
    assert_nothing_stored(store, device)


def test_an_unregistered_device_is_refused(store: FleetStore) -> None:
    device = FakeDevice()
    body = device.report()
    error = refused(store, body, device.sign(body))
    assert (error.code, error.reason) == (403, "unregistered")
    assert_nothing_stored(store, device)
    assert store.devices() == []


def test_a_revoked_device_is_refused(store: FleetStore) -> None:
    device = FakeDevice()
    enrol(store, device)
    assert store.revoke(device.device_id, "stolen", time.time())
    body = device.report()
    error = refused(store, body, device.sign(body))
    assert (error.code, error.reason) == (403, "revoked")
    assert_nothing_stored(store, device)


def test_a_forged_report_is_refused(store: FleetStore) -> None:
    """Signed by another key, even another registered device's: the claimed device's
    registered identity is what checks the signature."""
    victim, attacker = FakeDevice(), FakeDevice()
    enrol(store, victim)
    enrol(store, attacker)
    body = victim.report()
    for signature in (
        attacker.sign(body),
        fleetreport.sign(FakeDevice().key, body),
        "ed25519 " + "A" * 86 + "==",
        "rsa " + victim.sign(body).split()[1],
        victim.sign(body + b" "),
    ):
        error = refused(store, body, signature)
        assert (error.code, error.reason) == (401, "bad-signature")
    assert_nothing_stored(store, victim)
    assert_nothing_stored(store, attacker)


def test_a_report_naming_a_model_not_followed_is_refused(store: FleetStore) -> None:
    device = FakeDevice(models=["detector"])
    enrol(store, device)
    body = device.report({"detector": model_entry(), "keylogger": model_entry()})
    error = refused(store, body, device.sign(body))
    assert (error.code, error.reason) == (422, "model-not-followed")
    assert "keylogger" in str(error)
    assert_nothing_stored(store, device)


def test_a_replayed_report_is_refused_and_the_stored_one_kept(store: FleetStore) -> None:
    device = FakeDevice()
    enrol(store, device)
    first = device.report({"detector": model_entry(version="1.0.0")}, counter=10)
    ingest.ingest(store, first, device.sign(first), now=time.time())
    older = device.report({"detector": model_entry(version="0.9.0")}, counter=9)
    for body in (first, older):
        error = refused(store, body, device.sign(body))
        assert (error.code, error.reason) == (409, "replayed")
    assert store.last_report(device.device_id) == json.loads(first)
    assert store.device(device.device_id).last_counter == 10  # type: ignore[union-attr]
    (state,) = store.states()
    assert state.version == "1.0.0"


def test_the_identity_cache_never_hides_a_revocation(store: FleetStore) -> None:
    cache = ingest.IdentityCache(ttl_s=60)
    device = FakeDevice()
    enrol(store, device)
    body = device.report()
    ingest.ingest(store, body, device.sign(body), now=time.time(), cache=cache)
    assert cache.get(device.device_id) is not None
    assert store.revoke(device.device_id, "stolen", time.time())
    second = device.report()
    with pytest.raises(RefusedError) as info:
        ingest.ingest(store, second, device.sign(second), now=time.time(), cache=cache)
    assert (info.value.code, info.value.reason) == (403, "revoked")
    assert cache.get(device.device_id) is None
    assert store.last_report(device.device_id) == json.loads(body)


def test_the_identity_cache_checks_the_cached_key(store: FleetStore) -> None:
    cache = ingest.IdentityCache(ttl_s=60)
    device = FakeDevice()
    enrol(store, device)
    body = device.report()
    ingest.ingest(store, body, device.sign(body), now=time.time(), cache=cache)
    forged = device.report()
    error = refused_with_cache(store, forged, FakeDevice().sign(forged), cache)
    assert (error.code, error.reason) == (401, "bad-signature")
    assert store.device(device.device_id).last_counter == 1  # type: ignore[union-attr]


def refused_with_cache(
    store: FleetStore, body: bytes, signature: str, cache: ingest.IdentityCache
) -> RefusedError:
    with pytest.raises(RefusedError) as info:
        ingest.ingest(store, body, signature, now=time.time(), cache=cache)
    return info.value
