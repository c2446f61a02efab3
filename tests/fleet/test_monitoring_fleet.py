"""Model monitoring on the fleet side: the store keeps each model's monitoring figures
(migration 3, both backends), ``fleet status`` lists drifting devices and the canary
comparison, and a watched rollout halts on a confidence regression against the previous
revision on the same devices. Real stores, real signed reports through the service's
own ingest, a real repository for the watcher."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgepack.cli import main
from edgepack.fleet import migrations
from edgepack.fleet.ingest import device_from_record, ingest
from edgepack.fleet.sql import SQLStore, open_store
from edgepack.fleet.store import RefusedError
from edgepack.fleet.summary import fleet_status
from edgepack.repo import _rollouts
from tests.fleet._devices import FakeDevice, model_entry
from tests.fleet.test_watch import HOUR, T0, Rig, _tree, make_rig, template

__all__ = ["template"]  # the module-scoped repository fixture, shared with test_watch

STALE_S = 3600.0


def figures(
    revision: str,
    confidence: float | None,
    *,
    alerts: tuple[str, ...] = (),
    drift: float = 0.03,
    rows: int = 500,
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A model's monitoring entry (MONITORING_KEYS), with ``previous`` when given."""
    entry: dict[str, Any] = {
        "revision": revision,
        "rows": rows,
        "drift_psi": drift,
        "max_feature_psi": drift * 3,
        "anomaly_rate": 0.01 if not alerts else 0.2,
        "mean_confidence": confidence,
        "alerts": list(alerts),
    }
    if previous is not None:
        entry["previous"] = previous
    return entry


def canary(new: float, old: float, *, alerts: tuple[str, ...] = ()) -> dict[str, Any]:
    """Figures of r2 (running) beside those of r1 (run before it on the device)."""
    return figures("r2", new, alerts=alerts, previous=figures("r1", old))


def enrol(store: SQLStore, count: int, model: str = "digits") -> list[FakeDevice]:
    devices = [FakeDevice(models=[model]) for _ in range(count)]
    for device in devices:
        store.register(device_from_record(device.record(), now=T0))
    return devices


def send(
    store: SQLStore,
    device: FakeDevice,
    at: float,
    monitoring: dict[str, Any] | None,
    *,
    model: str = "digits",
    version: str = "2.0.0",
    revision: str = "r2",
) -> None:
    entry = model_entry(version=version, revision=revision)
    if monitoring is not None:
        entry["monitoring"] = monitoring
    body = device.report({model: entry})
    ingest(store, body, device.sign(body), now=at)


# -- the store ----------------------------------------------------------------------------


def test_a_version_2_store_migrates_and_keeps_its_data(store_url: str) -> None:
    store = open_store(store_url, migrate=False)
    try:
        assert store.migrate(target=2) == 2
        (device,) = enrol(store, 1)
        # A state as version 2 wrote it: no monitoring column yet.
        store.executemany(
            "INSERT INTO model_states (device_id, model, channel, version, revision, state, "
            "last_action, last_error, refused, pending, health_latency_ms, stale, reported_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(device.device_id, "digits", "stable", "1.0.0", "r1", "running", "none", None,
              "{}", None, 3.5, 0, T0)],
        )  # fmt: skip
        assert store.migrate() == migrations.LATEST == 3
        assert [v for v, _ in store.schema()] == [1, 2, 3]
        (state,) = store.states()
        assert (state.version, state.revision, state.reported_at) == ("1.0.0", "r1", T0)
        assert state.monitoring is None
        assert store.device(device.device_id) is not None
        # Reports after the migration fill the new column.
        send(store, device, T0 + 60, canary(0.9, 0.92))
        (state,) = store.states()
        assert state.monitoring == canary(0.9, 0.92)
        assert store.status_rows()[0][-1] is not None
    finally:
        store.close()


def test_ingest_stores_monitoring_and_refuses_a_malformed_one(store: SQLStore) -> None:
    first, second = enrol(store, 2)
    send(store, first, T0, figures("r2", 0.81, alerts=("drift",)))
    send(store, second, T0, None)
    by_device = {s.device_id: s for s in store.states()}
    assert by_device[first.device_id].monitoring == figures("r2", 0.81, alerts=("drift",))
    assert by_device[second.device_id].monitoring is None
    kept = store.last_report(first.device_id)
    for bad in (
        {**figures("r2", 0.8), "alerts": ["not-a-kind"]},
        {**figures("r2", 0.8), "drift_psi": -1},
        {**figures("r2", 0.8), "extra": 1},
        {k: v for k, v in figures("r2", 0.8).items() if k != "rows"},
        figures("r2", 0.8, previous={**figures("r1", 0.9), "previous": None}),
        "high",
    ):
        entry = model_entry(version="2.0.0", revision="r2")
        entry["monitoring"] = bad
        body = first.report({"digits": entry})
        with pytest.raises(RefusedError) as refused:
            ingest(store, body, first.sign(body), now=T0 + 60)
        assert (refused.value.code, refused.value.reason) == (400, "malformed")
    assert store.last_report(first.device_id) == kept
    assert store.device(first.device_id).last_counter == 1  # type: ignore[union-attr]
    assert by_device[first.device_id] == {s.device_id: s for s in store.states()}[first.device_id]


# -- fleet status -------------------------------------------------------------------------


def test_fleet_status_lists_drifting_devices_and_the_canary_comparison(store: SQLStore) -> None:
    now = T0 + HOUR
    a, b, c, stale, other, plain = enrol(store, 6)
    send(store, a, now, canary(0.80, 0.90))
    send(store, b, now, canary(0.70, 0.90, alerts=("confidence", "drift")))
    send(store, c, now, figures("r2", 0.75))  # no previous: no canary pair
    send(store, stale, now - 2 * STALE_S, canary(0.1, 0.9, alerts=("drift",)))
    # Figures of another revision than the one running are not this release's.
    send(store, other, now, figures("r1", 0.2, alerts=("drift",)))
    send(store, plain, now, None, version="1.0.0", revision="r1")
    status = fleet_status(store, now=now, stale_after_s=STALE_S)
    assert [(d["device_id"], d["alerts"]) for d in status["drifting"]] == [
        (b.device_id, ["confidence", "drift"])
    ]
    (drifting,) = status["drifting"]
    assert (drifting["model"], drifting["version"], drifting["revision"]) == (
        "digits",
        "2.0.0",
        "r2",
    )
    assert drifting["mean_confidence"] == 0.70 and drifting["anomaly_rate"] == 0.2
    releases = {r["version"]: r for r in status["releases"]}
    assert releases["1.0.0"]["monitoring"] is None
    mon = releases["2.0.0"]["monitoring"]
    assert (mon["reporting"], mon["alerting"]) == (3, 1)
    assert mon["alerts"] == {"confidence": 1, "drift": 1}
    assert mon["median_drift_psi"] == pytest.approx(0.03)
    assert mon["mean_confidence"] == pytest.approx(0.75)
    pair = mon["canary"]
    assert pair["devices"] == 2
    assert pair["confidence"] == pytest.approx(0.75)
    assert pair["previous_confidence"] == pytest.approx(0.90)
    assert pair["change"] == pytest.approx(-0.15)
    assert pair["previous_revisions"] == {"r1": 2}
    json.dumps(status, allow_nan=False)  # the API's and --json's shape


def test_fleet_status_cli_shows_drift_and_the_comparison(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    store = open_store(url)
    try:
        a, b = enrol(store, 2)
        now = time.time()  # the CLI runs on the real clock
        send(store, a, now, canary(0.80, 0.90))
        send(store, b, now, canary(0.70, 0.90, alerts=("confidence",)))
    finally:
        store.close()
    assert main(["fleet", "status", "--db", url]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "1 drifting (monitoring alerts):" in out
    assert b.device_id in out and "confidence" in out
    assert "-0.150 (0.750 vs 0.900, n=2)" in out
    assert main(["fleet", "status", "--db", url, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [d["device_id"] for d in shown["drifting"]] == [b.device_id]
    assert shown["releases"][0]["monitoring"]["canary"]["devices"] == 2


# -- the rollout policy -------------------------------------------------------------------


@pytest.fixture
def rig(template: Path, tmp_path: Path, store_url: str) -> Iterator[Rig]:
    """A watched repository over a fleet store on each backend, four devices registered."""
    made = make_rig(template, tmp_path, store_url, count=4)
    try:
        yield made
    finally:
        made.store.close()


def _promote(rig: Rig, **policy: Any) -> None:
    rig.promote(halt_on_failure=None, halt_on_confidence_drop="0.05", **policy)


def test_watch_halts_on_a_confidence_drop_over_min_devices(rig: Rig) -> None:
    _promote(rig, min_devices=3, on_failure=None)
    for device in rig.devices[:3]:
        send(rig.store, device, T0 + 60, canary(0.80, 0.90))
    decisions = rig.watch(T0 + 120)
    assert [(d.action, d.step) for d in decisions] == [("halt", 10.0)]
    reason = decisions[0].reason
    assert "mean confidence dropped by 0.100" in reason
    assert "previous revision r1 on the same 3 fresh devices" in reason
    assert decisions[0].details["monitoring"]["canary_devices"] == 3
    assert rig.record().state == "halted"
    assert [d.action for d in rig.store.decisions()] == ["halt"]


def test_watch_does_not_halt_under_min_devices_nor_on_a_small_drop(rig: Rig) -> None:
    _promote(rig, min_devices=3)
    for device in rig.devices[:2]:
        send(rig.store, device, T0 + 60, canary(0.50, 0.90))  # a big drop, on only 2
    send(rig.store, rig.devices[2], T0 + 60, figures("r2", 0.1))  # no comparison
    assert rig.watch(T0 + 120) == []
    assert rig.record().state == "watching"
    for device in rig.devices[:3]:
        send(rig.store, device, T0 + 180, canary(0.87, 0.90))  # 0.03: within 0.05
    assert rig.watch(T0 + 240) == []
    assert rig.record().state == "watching" and rig.store.decisions() == []


def test_watch_does_not_count_stale_reports(rig: Rig) -> None:
    _promote(rig, min_devices=3)
    for device in rig.devices[:3]:
        send(rig.store, device, T0 + 60, canary(0.50, 0.90))
    # Two hours later the reports are stale (the bound is one hour): nothing decided.
    assert rig.watch(T0 + 60 + 2 * HOUR) == []
    assert rig.record().state == "watching" and rig.store.decisions() == []


def test_watch_rolls_back_on_a_share_of_drift_alerts(rig: Rig) -> None:
    rig.promote(
        halt_on_failure=None, halt_on_drift_alerts="50%", min_devices=2, on_failure="rollback"
    )
    send(rig.store, rig.devices[0], T0 + 60, figures("r2", 0.9, alerts=("drift",)))
    send(rig.store, rig.devices[1], T0 + 60, figures("r2", 0.9))
    decisions = rig.watch(T0 + 120)
    assert [(d.action, d.details["to_version"]) for d in decisions] == [("rollback", "1.0.0")]
    assert "1 of 2 fresh devices raise monitoring alerts" in decisions[0].reason
    assert rig.document().current.version == "1.0.0"
    assert rig.record().state == "rolled-back"


def test_a_confidence_policy_is_recorded_and_old_files_still_read(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["promote", "digits", "2.0.0", "--repo", str(rig.workdir), "--channel", "stable"]
    argv += ["--rollout", "10", "--halt-on-confidence-drop", "0.05", "--min-devices", "3"]
    assert main(argv) == 0, capsys.readouterr().err
    assert "a confidence drop over 0.05" in capsys.readouterr().out
    policy = rig.record().policy
    assert (policy.halt_on_failure, policy.halt_on_confidence_drop) == (None, 0.05)
    stored = json.loads(_rollouts.rollouts_path(rig.workdir).read_text())
    assert stored["rollouts"][0]["policy"]["halt_on_confidence_drop"] == 0.05
    assert "halt_on_drift_alerts" not in stored["rollouts"][0]["policy"]
    # A file written before the monitoring policies (no such keys) reads as before.
    rig.promote()
    stored = json.loads(_rollouts.rollouts_path(rig.workdir).read_text())
    assert set(stored["rollouts"][0]["policy"]) == {
        "halt_on_failure", "min_devices", "on_failure", "widen", "widen_after_s"
    }  # fmt: skip
    assert rig.record().policy == _rollouts.Policy(0.05, 3)


@pytest.mark.parametrize(
    "flags",
    [
        ["--halt-on-confidence-drop", "5%"],
        ["--halt-on-confidence-drop", "0"],
        ["--halt-on-confidence-drop", "1.5"],
        ["--halt-on-confidence-drop", "nan"],
        ["--halt-on-confidence-drop", "lots"],
        ["--halt-on-drift-alerts", "150%"],
    ],
)
def test_promote_with_a_bad_monitoring_policy_exits_2_and_writes_nothing(
    rig: Rig, flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    rig.promote()
    before = _tree(rig.workdir)
    argv = ["promote", "digits", "3.0.0", "--repo", str(rig.workdir), "--channel", "stable"]
    code = main([*argv, "--rollout", "10", *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("edgepack: error: ")
    assert _tree(rig.workdir) == before
