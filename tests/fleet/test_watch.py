"""``fleet watch``: rollouts that halt, roll back or widen from what real devices report.

Everything is real: a repository with real keys and real bundles (digits 1.0.0 at
100% on stable, then 2.0.0 promoted at 10% with a policy), a real fleet store
(SQLite in tmp_path; PostgreSQL too for two watchers at once), devices with fresh
Ed25519 identities whose signed reports go through the service's own ingest.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from edgepack import repo
from edgepack.cli import main
from edgepack.errors import InvalidInputError
from edgepack.fleet.ingest import device_from_record, ingest
from edgepack.fleet.sql import SQLStore, open_store
from edgepack.fleet.store import Decision
from edgepack.fleet.watch import watch_once
from edgepack.keys import generate_recipient_key, generate_signing_key
from edgepack.repo import _channels, _rollouts
from edgepack.repo._channels import load_document
from edgepack.repo._ops import change_channels
from edgepack.repo._ops import open_store as open_repo
from edgepack.repo._settings import RepoPaths
from edgepack.repo._store import publish_lock
from tests.fleet._devices import FakeDevice, model_entry
from tests.repo.conftest import Producer, make_bundle, team_key

ROOT = Path(__file__).resolve().parents[2]
BASE = datetime.now(timezone.utc).replace(microsecond=0)
"""The repository's clock at the promote; the watcher runs at BASE + a few hours."""
T0 = BASE.timestamp()
HOUR = 3600.0
FAILED = {"2.0.0": "health check failed: 512 ms over the 200 ms budget"}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits 1.0.0 and 2.0.0 published, 1.0.0 at 100% on stable; copied by every test."""
    base = tmp_path_factory.mktemp("template")
    workdir = base / "repo"
    repo.init(workdir, passphrase=None, now=BASE)
    private, public = team_key(base / "teams", "digits")
    repo.add_model(workdir, "digits", public, passphrase=repo.no_passphrase, now=BASE)
    producer = Producer(generate_signing_key(), generate_recipient_key())
    bundles = base / "bundles"
    bundles.mkdir()
    for version in ("1.0.0", "2.0.0", "3.0.0"):
        bundle = make_bundle(bundles, producer, "digits", version, architectures=("x86_64",))
        repo.publish(workdir, [bundle], key=str(private), passphrase=repo.no_passphrase, now=BASE)
    repo.promote(
        workdir, "digits", "1.0.0", channel="stable", passphrase=repo.no_passphrase, now=BASE
    )
    return workdir


@dataclass
class Rig:
    """A repository copy, a fleet store and its registered devices."""

    workdir: Path
    store: SQLStore
    devices: list[FakeDevice]

    @property
    def key(self) -> str:
        """The operators' key the watcher is given."""
        return str(self.workdir / "keys" / "operators.key")

    def promote(self, cohorts: tuple[str, ...] = (), **policy: Any) -> None:
        """2.0.0 at 10% on stable, watched under ``policy`` (make_policy's arguments)."""
        options: dict[str, Any] = {
            "halt_on_failure": "5%",
            "min_devices": 3,
            "on_failure": None,
            "widen": None,
            "widen_after": None,
        }
        options.update(policy)
        repo.promote(
            self.workdir,
            "digits",
            "2.0.0",
            channel="stable",
            rollout=10,
            cohorts=cohorts,
            passphrase=repo.no_passphrase,
            now=BASE,
            policy=_rollouts.make_policy(rollout=10, **options),
        )

    def report(self, device: FakeDevice, at: float, **entry: Any) -> None:
        """A signed report of ``device`` about digits, through the service's ingest."""
        body = device.report({"digits": model_entry(channel="stable", **entry)})
        ingest(self.store, body, device.sign(body), now=at)

    def running(self, devices: list[FakeDevice], at: float) -> None:
        for device in devices:
            self.report(device, at, version="2.0.0")

    def failing(self, devices: list[FakeDevice], at: float, *, stale: bool = False) -> None:
        for device in devices:
            self.report(device, at, version="1.0.0", refused=dict(FAILED), stale=stale)

    def watch(self, at: float, *, key: bool = True, stale_after_s: float = HOUR) -> list[Any]:
        return watch_once(
            self.store,
            self.workdir,
            key=self.key if key else None,
            passphrase=repo.no_passphrase,
            now=at,
            stale_after_s=stale_after_s,
        )

    def document(self) -> Any:
        _p, _s, store = open_repo(self.workdir, repo.no_passphrase, BASE + timedelta(hours=1))
        return load_document(store, "digits", "stable")

    def record(self) -> _rollouts.Rollout:
        return _rollouts.load(self.workdir)[("digits", "stable")]


def make_rig(template: Path, directory: Path, url: str, count: int = 8) -> Rig:
    workdir = directory / "repo"
    shutil.copytree(template, workdir)
    store = open_store(url)
    devices = [FakeDevice(models=["digits"]) for _ in range(count)]
    for device in devices:
        store.register(device_from_record(device.record(), now=T0))
    return Rig(workdir, store, devices)


@pytest.fixture
def rig(template: Path, tmp_path: Path) -> Iterator[Rig]:
    made = make_rig(template, tmp_path, f"sqlite:///{tmp_path / 'fleet.db'}")
    try:
        yield made
    finally:
        made.store.close()


def test_failures_over_the_threshold_halt_and_nothing_widens_after(rig: Rig) -> None:
    rig.promote(widen="25,50,100", widen_after="1h")
    before = rig.document()
    rig.failing(rig.devices[:1], T0 + 60)
    rig.running(rig.devices[1:3], T0 + 60)
    decisions = rig.watch(T0 + 120)
    assert [(d.action, d.step) for d in decisions] == [("halt", 10.0)]
    assert "1 of 3 fresh devices failed" in decisions[0].reason
    assert "health check failed" in decisions[0].reason
    assert rig.record().state == "halted"
    assert rig.document() == before  # halting publishes nothing: 10% is already frozen
    assert [d.action for d in rig.store.decisions()] == ["halt"]
    # Healthy long after: a halted rollout does not widen.
    rig.running(rig.devices, T0 + 3 * HOUR)
    assert rig.watch(T0 + 3 * HOUR + 60) == []
    assert rig.document() == before
    assert rig.record().state == "halted"


def test_on_failure_rollback_publishes_the_previous_release(rig: Rig) -> None:
    rig.promote(on_failure="rollback")
    before = rig.document()
    assert before.current.version == "2.0.0"
    rig.failing(rig.devices[:2], T0 + 60)
    rig.running(rig.devices[2:3], T0 + 60)
    decisions = rig.watch(T0 + 120)
    assert [(d.action, d.details["to_version"]) for d in decisions] == [("rollback", "1.0.0")]
    after = rig.document()
    assert after.sequence == before.sequence + 1
    assert after.current.version == "1.0.0" and after.current.rollout == 100
    assert after.previous[0].version == "2.0.0"
    assert rig.record().state == "rolled-back"
    assert "rolled back to 1.0.0" in rig.record().reason
    # A second pass decides nothing more and publishes nothing more.
    assert rig.watch(T0 + 180) == []
    assert rig.document() == after


def test_without_a_key_a_rollback_needs_an_operator_and_nothing_is_published(rig: Rig) -> None:
    rig.promote(on_failure="rollback")
    before = rig.document()
    rig.failing(rig.devices[:3], T0 + 60)
    decisions = rig.watch(T0 + 120, key=False)
    assert [d.action for d in decisions] == ["rollback"]
    assert decisions[0].details["needs_operator"] is True
    assert "needs an operator" in decisions[0].reason
    assert rig.document() == before
    assert rig.record().state == "halted"
    assert rig.store.decisions()[0].details["needs_operator"] is True


def test_under_min_devices_nothing_is_decided(rig: Rig) -> None:
    rig.promote(on_failure="rollback")
    before = rig.document()
    rig.failing(rig.devices[:2], T0 + 60)  # 100% failed, but only 2 of the 3 needed
    assert rig.watch(T0 + 120) == []
    assert rig.document() == before
    assert rig.record().state == "watching"
    assert rig.store.decisions() == []
    rig.failing(rig.devices[2:3], T0 + 130)  # the third: now it is decided
    assert [d.action for d in rig.watch(T0 + 140)] == ["rollback"]


def test_a_threshold_crossed_by_stale_reports_only_does_not_halt(rig: Rig) -> None:
    rig.promote(on_failure="rollback")
    before = rig.document()
    # Three failed long ago (silent since), one says it is stale, three run fine now.
    rig.failing(rig.devices[:3], T0 - 2 * HOUR)
    rig.failing(rig.devices[3:4], T0 + 60, stale=True)
    rig.running(rig.devices[4:8], T0 + 60)
    assert rig.watch(T0 + 120) == []
    assert rig.document() == before
    assert rig.record().state == "watching"
    assert rig.store.decisions() == []


def test_a_healthy_rollout_widens_after_the_wait_not_before(rig: Rig) -> None:
    rig.promote(widen="25,50,100", widen_after="1h")
    start = rig.document()
    rig.running(rig.devices[:3], T0 + 60)
    assert rig.watch(T0 + HOUR - 60, stale_after_s=86400) == []  # not yet an hour
    assert rig.document() == start
    steps = []
    at = T0 + HOUR
    for _ in range(3):
        decisions = rig.watch(at, stale_after_s=86400)
        assert [d.action for d in decisions] == ["widen"]
        steps.append(rig.document().current.rollout)
        assert rig.watch(at + 60, stale_after_s=86400) == []  # the wait starts again
        at += HOUR
    assert steps == [25, 50, 100]
    final = rig.document()
    assert final.sequence == start.sequence + 3 and final.current.version == "2.0.0"
    assert rig.record().state == "complete"
    assert [d.step for d in rig.store.decisions()] == [25, 50, 100]


def test_widening_keeps_the_cohorts(rig: Rig) -> None:
    rig.promote(cohorts=("lab",), widen="50", widen_after="1h")
    rig.running(rig.devices[:3], T0 + 60)
    assert [d.step for d in rig.watch(T0 + HOUR, stale_after_s=86400)] == [50]
    current = rig.document().current
    assert (current.version, current.rollout, current.cohorts) == ("2.0.0", 50, ("lab",))


def test_no_widening_without_enough_fresh_devices(rig: Rig) -> None:
    rig.promote(widen="25", widen_after="1h")
    rig.running(rig.devices[:2], T0 + 60)  # healthy, but two devices vouch for it, not three
    assert rig.watch(T0 + 2 * HOUR, stale_after_s=86400) == []
    assert rig.document().current.rollout == 10


def test_a_channel_changed_by_hand_is_no_longer_watched(rig: Rig) -> None:
    rig.promote(on_failure="rollback")
    repo.promote(
        rig.workdir, "digits", "3.0.0", channel="stable", passphrase=repo.no_passphrase, now=BASE
    )
    assert ("digits", "stable") not in _rollouts.load(rig.workdir)  # no policy: not watched
    rig.promote(on_failure="rollback")
    repo.rollback(rig.workdir, "digits", channel="stable", passphrase=repo.no_passphrase, now=BASE)
    assert rig.record().state == "rolled-back"
    assert rig.record().reason == "rolled back by hand"
    # A publisher that does not keep the records (publish --channel) moves the channel:
    # the watcher notices, stops watching and publishes nothing.
    rig.promote(on_failure="rollback")
    change_channels(
        rig.workdir,
        lambda s: [_channels.promote(s, "digits", "3.0.0", "stable")],
        passphrase=repo.no_passphrase,
        now=BASE,
    )
    moved = rig.document()
    rig.failing(rig.devices[:3], T0 + 60)
    assert rig.watch(T0 + 120) == []
    assert rig.record().state == "superseded"
    assert rig.document() == moved
    assert rig.store.decisions() == []


def test_a_damaged_rollouts_file_is_one_clear_error(rig: Rig) -> None:
    rig.promote()
    path = rig.workdir / "rollouts.json"
    doc = json.loads(path.read_text())
    doc["rollouts"][0]["policy"]["halt_on_failure"] = 5  # 500%: not a fraction
    path.write_text(json.dumps(doc))
    with pytest.raises(InvalidInputError, match="halt-on-failure"):
        rig.watch(T0 + 60)
    path.write_text('{"format": "edgepack-rollouts", "format_version": 1, "rollouts": [], "x": 1}')
    with pytest.raises(InvalidInputError, match="unknown field"):
        rig.watch(T0 + 60)


def _tree(workdir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(workdir)): p.read_bytes()
        for p in sorted(workdir.rglob("*"))
        if p.is_file() and p.name != ".publish.lock"
    }


@pytest.mark.parametrize(
    "flags",
    [
        ["--halt-on-failure", "150%"],
        ["--halt-on-failure", "0%"],
        ["--halt-on-failure", "five"],
        ["--halt-on-failure", "5%", "--min-devices", "0"],
        ["--halt-on-failure", "5%", "--min-devices", "three"],
        ["--halt-on-failure", "5%", "--on-failure", "explode"],
        ["--halt-on-failure", "5%", "--widen", "5,50", "--widen-after", "1h"],
        ["--halt-on-failure", "5%", "--widen", "50,25", "--widen-after", "1h"],
        ["--halt-on-failure", "5%", "--widen", "25,150", "--widen-after", "1h"],
        ["--halt-on-failure", "5%", "--widen", "25,50"],
        ["--halt-on-failure", "5%", "--widen", "25", "--widen-after", "6x"],
        ["--halt-on-failure", "5%", "--widen-after", "6h"],
        ["--min-devices", "3"],
    ],
)
def test_promote_with_bad_policy_flags_exits_2_and_writes_nothing(
    rig: Rig, flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    rig.promote(widen="25,50", widen_after="6h")  # an earlier watched rollout on record
    before = _tree(rig.workdir)
    argv = ["promote", "digits", "3.0.0", "--repo", str(rig.workdir), "--channel", "stable"]
    code = main([*argv, "--rollout", "10", *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("edgepack: error: ")
    assert _tree(rig.workdir) == before


def test_promote_with_policy_flags_records_the_rollout(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["promote", "digits", "2.0.0", "--repo", str(rig.workdir), "--channel", "stable"]
    argv += ["--rollout", "10", "--halt-on-failure", "5%", "--min-devices", "3"]
    argv += ["--on-failure", "rollback", "--widen", "25,50,100", "--widen-after", "6h"]
    assert main(argv) == 0, capsys.readouterr().err
    record = rig.record()
    assert (record.version, record.state, record.step) == ("2.0.0", "watching", 10)
    assert record.policy == _rollouts.Policy(0.05, 3, "rollback", (25, 50, 100), 6 * HOUR)
    assert "watched: rollback at 5% failures" in capsys.readouterr().out
    assert main([*argv, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["rollout_policy"]
    assert shown == {
        "halt_on_failure": 0.05,
        "min_devices": 3,
        "on_failure": "rollback",
        "widen": [25, 50, 100],
        "widen_after_s": 6 * HOUR,
    }


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_watchers_at_once_make_one_decision_and_one_publish(
    template: Path, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'fleet.db'}"
    else:
        from tests.pg import create_database

        url = create_database(request.getfixturevalue("pg_url"), f"watch_{os.getpid()}")
    rig = make_rig(template, tmp_path, url, count=4)
    try:
        rig.promote(on_failure="rollback")
        before = rig.document()
        metadata = rig.workdir / "public" / "metadata"
        operators_before = len(list(metadata.glob("*.operators.json")))
        now = datetime.now(timezone.utc).timestamp()  # the CLI runs on the real clock
        rig.failing(rig.devices[:3], now)
        rig.running(rig.devices[3:], now)
        argv = [sys.executable, "-m", "edgepack.cli", "fleet", "watch", "--once", "--json"]
        argv += ["--db", url, "--repo", str(rig.workdir), "--key", rig.key]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        # The test holds the repository's lock until both watchers have decided, so
        # both reach the publishing step with the same view: a real race, every run.
        with publish_lock(RepoPaths(rig.workdir)):
            procs = [
                subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
                for _ in range(2)
            ]
            deadline = time.monotonic() + 30
            while not rig.store.decisions() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)  # the loser's claim follows the winner's within this
        outs = [p.communicate(timeout=60) for p in procs]
        for proc, (_out, err) in zip(procs, outs, strict=True):
            assert proc.returncode == 0, err.decode()
        won = [json.loads(out)["decisions"] for out, _err in outs]
        assert sorted(len(w) for w in won) == [0, 1]
        assert [d.action for d in rig.store.decisions()] == ["rollback"]
        after = rig.document()
        assert after.sequence == before.sequence + 1  # one publish, not two
        assert after.current.version == "1.0.0"
        assert rig.record().state == "rolled-back"
        assert len(list(metadata.glob("*.operators.json"))) == operators_before + 1
    finally:
        rig.store.close()


def test_the_loop_decides_and_stops_on_sigterm(rig: Rig) -> None:
    rig.promote()
    now = datetime.now(timezone.utc).timestamp()
    rig.failing(rig.devices[:3], now)
    argv = [sys.executable, "-m", "edgepack.cli", "fleet", "watch", "--interval", "1s", "--json"]
    argv += ["--db", rig.store.url, "--repo", str(rig.workdir)]  # no key: halting needs none
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 30
        while not rig.store.decisions() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)  # at least one more pass, which decides nothing more
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert [(d["action"], d["step"]) for d in lines] == [("halt", 10.0)]
    assert "halt at 10%" in err.decode() and "SIGTERM" in err.decode()
    assert rig.record().state == "halted"


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--interval", "soon"], "--interval takes a duration"),
        (["--stale-after", "0s"], "--stale-after takes a duration"),
    ],
)
def test_watch_with_bad_options_exits_2_in_one_line(
    rig: Rig, flags: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["fleet", "watch", "--once", "--db", rig.store.url, "--repo", str(rig.workdir)]
    assert main([*argv, *flags]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and words in err


def test_watch_of_a_missing_repository_is_one_line(
    rig: Rig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["fleet", "watch", "--once", "--db", rig.store.url, "--repo", str(tmp_path / "none")]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("edgepack: error: ")


def test_revoking_the_watched_release_by_hand_ends_the_watch(rig: Rig) -> None:
    rig.promote(on_failure="rollback")
    repo.revoke(rig.workdir, "digits", "2.0.0", passphrase=repo.no_passphrase, now=BASE)
    assert rig.record().state == "rolled-back"
    assert rig.record().reason == "revoked by hand"
    rig.failing(rig.devices[:3], T0 + 60)
    assert rig.watch(T0 + 120) == []


def test_a_decision_claimed_by_a_watcher_that_died_is_finished_by_the_next(rig: Rig) -> None:
    rig.promote(on_failure="rollback")
    before = rig.document()
    rig.failing(rig.devices[:3], T0 + 60)
    # A watcher claimed the rollback and died before publishing it.
    claimed = Decision("digits", "stable", "2.0.0", "rollback", 10.0, "died", T0 + 90, {})
    assert rig.store.claim(claimed)
    assert rig.watch(T0 + 120) == []  # this one lost the claim…
    after = rig.document()  # …and still made the decision take effect, once
    assert (after.sequence, after.current.version) == (before.sequence + 1, "1.0.0")
    assert rig.record().state == "rolled-back"
    assert [d.reason for d in rig.store.decisions()] == ["died"]
