"""Release health and fleet status on a small hand-made fleet, on both backends: every
figure counted by hand, stale reports never in a rate, filters, unseen devices."""

from __future__ import annotations

import json

import pytest

from edgepack.fleet.sql import SQLStore
from edgepack.fleet.store import Decision
from edgepack.fleet.summary import fleet_status, reason_key, release_health
from tests.fleet._fill import CHANNEL, MODEL, NEW, OLD, expected, fill
from tests.fleet._reports import Unit, entry

NOW = 1_800_000_000.0
HOUR = 3600.0
FRESH = NOW - 60
OLD_REPORT = NOW - 2 * HOUR


class Fleet:
    """Ten devices, each in a known place with release 2.0.0 of detector/stable."""

    def __init__(self, store: SQLStore) -> None:
        self.store = store
        self.units: dict[str, Unit] = {}

    def add(
        self, name: str, models: tuple[str, ...] = ("detector",), channel: str = "stable"
    ) -> Unit:
        unit = self.units[name] = Unit(models=models, channel=channel)
        assert self.store.register(unit.device(at=NOW - 10 * HOUR))
        return unit

    def id(self, name: str) -> str:
        return self.units[name].device_id


@pytest.fixture
def fleet(store: SQLStore) -> Fleet:
    f = Fleet(store)
    f.add("a").send(store, 1, {"detector": entry("2.0.0")}, at=FRESH)
    f.add("b").send(store, 1, {"detector": entry("2.0.0")}, at=FRESH)
    slow = "health check failed: p95 512 ms over the 200 ms budget"
    f.add("c").send(store, 1, {"detector": entry("1.0.0", refused={"2.0.0": slow})}, at=FRESH)
    broken = "health check failed (the session could not open)"
    f.add("d").send(store, 4, {"detector": entry("1.0.0", refused={"2.0.0": broken})}, at=FRESH)
    f.add("e").send(
        store, 1, {"detector": entry("1.0.0", pending="2.0.0", last_action="download")}, at=FRESH
    )
    f.add("f").send(
        store,
        1,
        {
            "detector": entry(
                "1.0.0",
                pending="2.0.0",
                last_action="failed",
                last_error="download failed: 404 from the mirror",
            )
        },
        at=FRESH,
    )
    # Stale by age: it ran 2.0.0 two hours ago.
    f.add("g").send(store, 1, {"detector": entry("2.0.0")}, at=OLD_REPORT)
    # Stale by its own word: its refusal must not count as a failure.
    f.add("h").send(
        store,
        1,
        {"detector": entry("1.0.0", refused={"2.0.0": "health check failed: x"}, stale=True)},
        at=FRESH,
    )
    f.add("never")  # registered, never seen
    f.add("gone").send(store, 1, {"detector": entry("1.0.0")}, at=FRESH)
    store.revoke(f.id("gone"), "decommissioned", NOW - 30)
    # Another model and channel on one device, and a device of only that model.
    f.add("multi", models=("detector", "classifier")).send(
        store,
        1,
        {
            "detector": entry("2.0.0"),
            "classifier": entry("0.4.0", channel="beta", refused={"0.5.0": "signature: bad"}),
        },
        at=FRESH,
    )
    f.add("cls-only", models=("classifier",), channel="beta")
    return f


def test_release_health_counts_by_hand(fleet: Fleet) -> None:
    health = release_health(fleet.store, "detector", "stable", "2.0.0", now=NOW, stale_after_s=HOUR)
    assert (health.running, health.installing, health.stale) == (3, 1, 2)  # a b multi; e; g h
    assert health.failed == {"health check failed": 2, "download failed": 1}  # c d; f
    assert health.failures == 3
    assert health.rate == pytest.approx(3 / 6)
    old = release_health(fleet.store, "detector", "stable", "1.0.0", now=NOW, stale_after_s=HOUR)
    # c d e f and the revoked one run it; h runs it but is stale.
    assert (old.running, old.failures, old.installing, old.stale) == (5, 0, 0, 1)
    nothing = release_health(
        fleet.store, "detector", "stable", "9.9.9", now=NOW, stale_after_s=HOUR
    )
    assert (nothing.running, nothing.failures, nothing.stale, nothing.rate) == (0, 0, 0, None)


def test_a_wider_stale_bound_brings_the_old_report_back(fleet: Fleet) -> None:
    health = release_health(
        fleet.store, "detector", "stable", "2.0.0", now=NOW, stale_after_s=3 * HOUR
    )
    assert (health.running, health.stale) == (4, 1)  # g is fresh again; h says it is stale


def test_failures_reported_only_by_stale_devices_give_no_rate(store: SQLStore) -> None:
    f = Fleet(store)
    for i in range(3):
        f.add(f"s{i}").send(
            store,
            1,
            {"detector": entry("1.0.0", refused={"2.0.0": "health check failed: slow"})},
            at=OLD_REPORT,
        )
    health = release_health(store, "detector", "stable", "2.0.0", now=NOW, stale_after_s=HOUR)
    assert (health.failures, health.stale, health.rate) == (0, 3, None)


def test_fleet_status_releases_devices_and_unseen(fleet: Fleet) -> None:
    assert fleet.store.claim(
        Decision("detector", "stable", "2.0.0", "halt", 10.0, "50% >= 5%", NOW - 5, {"rate": 0.5})
    )
    assert fleet.store.claim(Decision("classifier", "beta", "0.5.0", "halt", 10.0, "r", NOW - 4))
    status = fleet_status(fleet.store, now=NOW, stale_after_s=HOUR, unseen_since=NOW - HOUR)
    json.dumps(status, allow_nan=False)  # JSON-ready
    releases = {(r["model"], r["channel"], r["version"]): r for r in status["releases"]}
    assert list(releases) == sorted(releases)
    new = releases[("detector", "stable", "2.0.0")]
    assert {k: new[k] for k in ("running", "installing", "failed", "stale")} == {
        "running": 3,
        "installing": 1,
        "failed": {"download failed": 1, "health check failed": 2},
        "stale": 2,
    }
    assert new["failure_rate"] == pytest.approx(0.5)
    assert sorted(new["devices"]) == sorted(
        fleet.id(n) for n in ("a", "b", "c", "d", "e", "f", "g", "h", "multi")
    )
    assert releases[("classifier", "beta", "0.5.0")]["failed"] == {"signature": 1}
    assert releases[("classifier", "beta", "0.4.0")]["running"] == 1

    devices = {d["device_id"]: d for d in status["devices"]}
    assert set(devices) == {fleet.id(n) for n in fleet.units}
    g = devices[fleet.id("g")]
    assert (g["stale"], g["revoked"], g["last_seen"]) == (True, False, OLD_REPORT)
    assert devices[fleet.id("h")]["stale"] and not devices[fleet.id("a")]["stale"]
    assert devices[fleet.id("gone")]["revoked"]
    assert devices[fleet.id("never")] == {
        "device_id": fleet.id("never"),
        "last_seen": None,
        "stale": False,
        "revoked": False,
        "models": {},
    }
    f = devices[fleet.id("f")]["models"]["detector"]
    assert (f["version"], f["pending"], f["last_action"], f["last_error"], f["state"]) == (
        "1.0.0",
        "2.0.0",
        "failed",
        "download failed: 404 from the mirror",
        "running",
    )
    assert set(devices[fleet.id("multi")]["models"]) == {"classifier", "detector"}
    # Never seen, or not since an hour ago; the revoked one is not waited for.
    assert sorted(status["unseen"]) == sorted(
        [fleet.id("never"), fleet.id("g"), fleet.id("cls-only")]
    )
    assert [d["action"] for d in status["decisions"]] == ["halt", "halt"]
    assert status["decisions"][0]["details"] == {"rate": 0.5}


def test_fleet_status_narrowed_to_a_model_and_channel(fleet: Fleet) -> None:
    status = fleet_status(
        fleet.store, model="classifier", channel="beta", now=NOW, stale_after_s=HOUR
    )
    assert {r["version"] for r in status["releases"]} == {"0.4.0", "0.5.0"}
    assert {d["device_id"] for d in status["devices"]} == {fleet.id("multi"), fleet.id("cls-only")}
    assert status["unseen"] == [fleet.id("cls-only")]  # never seen; no unseen_since given
    assert status["decisions"] == []
    detector = fleet_status(fleet.store, model="detector", now=NOW, stale_after_s=HOUR)
    assert {r["model"] for r in detector["releases"]} == {"detector"}
    ids = {d["device_id"] for d in detector["devices"]}
    assert fleet.id("cls-only") not in ids and fleet.id("never") in ids
    assert all(set(d["models"]) <= {"detector"} for d in detector["devices"])


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("health check failed: p95 512 ms", "health check failed"),
        ("health check failed (no session)", "health check failed"),
        ("signature does not verify; bundle altered", "signature does not verify"),
        ("out of memory", "out of memory"),
        (": odd", ": odd"),
        ("", "failed"),
        (None, "failed"),
        ("x" * 300, "x" * 80),
    ],
)
def test_a_reason_groups_by_its_first_clause(text: str | None, key: str) -> None:
    assert reason_key(text) == key


def test_a_bulk_filled_fleet_gives_the_expected_figures(store: SQLStore) -> None:
    fill(store, 2000, now=NOW)
    status = fleet_status(store, now=NOW, stale_after_s=HOUR)
    (new,) = [r for r in status["releases"] if r["version"] == NEW]
    want = expected(2000)
    assert new["running"] == want["running"] and new["installing"] == want["installing"]
    assert new["stale"] == want["stale"]
    assert sum(new["failed"].values()) == want["failed"]
    assert set(new["failed"]) == {"health check failed"}
    (old,) = [r for r in status["releases"] if r["version"] == OLD]
    assert old["running"] == want["failed"] + want["installing"]
    assert len(status["devices"]) == 2000 and status["unseen"] == []
    health = release_health(store, MODEL, CHANNEL, NEW, now=NOW, stale_after_s=HOUR)
    assert health.rate == pytest.approx(want["failed"] / (want["failed"] + want["running"]))
