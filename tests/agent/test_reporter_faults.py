"""The report sender against a fleet service that is down, slow, failing or refusing.

A real loopback stand-in for the service (tests/agent/_fleetserver.py) checks each
report's signature and counter. The daemon (a real ``edgepack-agent run``) must keep
installing and keep its model, and poll at its interval, whatever the service does;
its queue stays bounded, and the queued reports arrive once the service is back.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from device_agent import config, report
from device_agent import enroll as enroll_mod
from device_agent.reporter import Reporter
from edgepack import fleetreport
from tests.agent._fleetserver import FleetServer
from tests.agent._support import MODEL, REPO_ROOT, World, fast_limits


@pytest.fixture
def fleet() -> Iterator[FleetServer]:
    server = FleetServer()
    yield server
    server.stop()


def _enroll(world: World, data: Path, fleet_url: str, **limits: Any) -> None:
    enroll_mod.enroll(
        data,
        repo_url=world.server.url,
        root=world.root_json,
        models=[MODEL],
        trust=world.producer_pub,
        recipient_key=world.fleet_key_path,
        limits=fast_limits(**limits),
        fleet_url=fleet_url,
    )


def _reporter(world: World, tmp_path: Path, fleet: FleetServer, **limits: Any) -> Reporter:
    data = tmp_path / "dev"
    _enroll(world, data, fleet.url, **{"report_timeout_s": 1.0, **limits})
    fleet.register(data)
    return Reporter(config.load(data), profile="", architecture="x86_64")


def _queued(data: Path) -> list[Path]:
    return sorted(report.queue_dir(data).glob("*.json"))


def _wait(what: str, until: Callable[[], object], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- one pass over the queue ----------------------------------------------------------------
def test_reports_go_oldest_first_and_are_deleted_when_taken(
    world: World, tmp_path: Path, fleet: FleetServer
) -> None:
    r = _reporter(world, tmp_path, fleet)
    doc = report.content(r.config, {}, profile="", architecture="x")
    counters = [r.queue.put(doc).counter for _ in range(3)]
    result = r.send_once()
    assert (result.sent, result.dropped, result.kept) == (3, 0, 0)
    assert [t["counter"] for t in fleet.taken()] == counters
    assert _queued(r.config.data_dir) == []


def test_the_stand_in_takes_only_reports_signed_by_the_registered_key(
    world: World, tmp_path: Path, fleet: FleetServer
) -> None:
    """The control for the tests above: a forged signature is not taken (and kept)."""
    r = _reporter(world, tmp_path, fleet)
    queued = r.queue.put(report.content(r.config, {}, profile="", architecture="x"))
    other = fleetreport.sign(ed25519.Ed25519PrivateKey.generate(), queued.body)
    queued.path.write_bytes(f"{fleetreport.SIGNATURE_HEADER}: {other}\n".encode() + queued.body)
    result = r.send_once()
    assert (result.sent, result.kept) == (0, 1) and "HTTP 401" in result.errors[0]
    assert fleet.taken() == []


@pytest.mark.parametrize("code", [400, 409, 413, 422])
def test_a_report_the_service_will_never_take_is_dropped(
    world: World, tmp_path: Path, fleet: FleetServer, code: int, caplog: pytest.LogCaptureFixture
) -> None:
    r = _reporter(world, tmp_path, fleet)
    r.queue.put(report.content(r.config, {}, profile="", architecture="x"))
    fleet.set(str(code))
    result = r.send_once()
    assert (result.sent, result.dropped, result.kept) == (0, 1, 0)
    assert _queued(r.config.data_dir) == []
    errors = [x.getMessage() for x in caplog.records if x.levelname == "ERROR"]
    assert any(f"HTTP {code}: mode {code}" in e for e in errors), errors


@pytest.mark.parametrize("mode", ["503", "500", "401", "403", "down", "slow"])
def test_a_report_the_service_may_take_later_is_kept(
    world: World, tmp_path: Path, fleet: FleetServer, mode: str
) -> None:
    r = _reporter(world, tmp_path, fleet, report_timeout_s=1.0)
    fleet.slow_s = 3.0
    for _ in range(2):
        r.queue.put(report.content(r.config, {}, profile="", architecture="x"))
    fleet.set(mode)
    started = time.monotonic()
    result = r.send_once()
    assert time.monotonic() - started < 2.5  # one try, cut at report_timeout_s, then stop
    assert (result.sent, result.dropped, result.kept) == (0, 0, 2)
    assert len(_queued(r.config.data_dir)) == 2
    fleet.set("ok")
    assert r.send_once().sent == 2
    assert len(fleet.taken()) == 2


def test_the_back_off_doubles_up_to_backoff_max(
    world: World, tmp_path: Path, fleet: FleetServer
) -> None:
    r = _reporter(world, tmp_path, fleet, backoff_max_s=12.0, poll_jitter=0.0)
    delays = []
    for failures in range(1, 6):
        r.failures = failures
        delays.append(r._backoff())
    assert delays == [5.0, 10.0, 12.0, 12.0, 12.0]


def test_queueing_after_a_poll_never_waits_on_a_slow_service(
    world: World, tmp_path: Path, fleet: FleetServer
) -> None:
    r = _reporter(world, tmp_path, fleet, report_timeout_s=3.0, report_interval_s=900.0)
    fleet.slow_s = 5.0
    fleet.set("slow")
    started = time.monotonic()
    r.after_poll()
    assert time.monotonic() - started < 0.5
    assert len(_queued(r.config.data_dir)) == 1 and r.wake.is_set()
    r.after_poll()  # nothing changed and the heartbeat is not due: no second report
    assert len(_queued(r.config.data_dir)) == 1


@pytest.mark.parametrize(("interval", "expected"), [(0.2, 2), (0.0, 1)])
def test_an_unchanged_report_is_queued_again_only_at_the_heartbeat(
    world: World, tmp_path: Path, fleet: FleetServer, interval: float, expected: int
) -> None:
    r = _reporter(world, tmp_path, fleet, report_interval_s=interval)
    r.after_poll()  # the first: its content is new
    r.after_poll()  # the same content, the heartbeat not due
    time.sleep(0.3)
    r.after_poll()  # the heartbeat due (none with report_interval_s 0)
    assert len(_queued(r.config.data_dir)) == expected


# -- the daemon against a failing service ---------------------------------------------------
def _status(data: Path) -> dict[str, Any]:
    try:
        doc = json.loads((data / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    model: dict[str, Any] = doc.get("models", {}).get(MODEL, {})
    return model


def _daemon(data: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPACK_")}
    env["EDGEPACK_DATA_DIR"] = str(data)
    with open(log, "wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "device_agent", "-v", "run"],
            env=env,
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=fh,
        )


@pytest.mark.parametrize("fault", ["down", "slow", "500"])
def test_the_daemon_updates_and_polls_on_time_while_the_fleet_fails(
    world: World, tmp_path: Path, fleet: FleetServer, fault: str
) -> None:
    data = tmp_path / "dev"
    interval = 0.5
    _enroll(
        world,
        data,
        fleet.url,
        poll_interval_s=interval,
        poll_jitter=0.0,
        backoff_max_s=1.0,
        report_timeout_s=2.0,
        report_interval_s=0.3,
        report_queue_max=4,
    )
    fleet.register(data)
    fleet.slow_s = 4.0
    fleet.set(fault)
    world.publish("1.0.0", 2.0)
    log = tmp_path / "daemon.log"
    proc = _daemon(data, log)
    try:
        _wait("1.0.0 installed", lambda: _status(data).get("version") == "1.0.0")
        world.publish("2.0.0", 3.0)
        _wait("2.0.0 installed", lambda: _status(data).get("version") == "2.0.0")
        # Polls keep their interval (a send that blocked the poll thread would add the
        # 2 s report timeout to every gap) and the queue stays within its bound.
        seen: list[float] = []
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            at = _status(data).get("last_attempt")
            if isinstance(at, float) and (not seen or at != seen[-1]):
                seen.append(at)
            assert len(_queued(data)) <= 4
            time.sleep(0.02)
        gaps = [b - a for a, b in itertools.pairwise(seen)]
        assert len(gaps) >= 3 and max(gaps) < interval + 1.0, gaps
        assert fleet.taken() == []
        if fault != "down":
            assert fleet.attempts > 0  # the sender did try, and failed
        assert proc.poll() is None
        fleet.set("ok")
        _wait(
            "the reports to arrive",
            lambda: any(t["models"][MODEL]["version"] == "2.0.0" for t in fleet.taken()),
            timeout=30,
        )
        taken = fleet.taken()
        counters = [t["counter"] for t in taken]
        assert counters == sorted(set(counters))
        assert all(t["device_id"] == config.load(data).device_id for t in taken)
        assert _status(data).get("version") == "2.0.0" and proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "report(s) kept for the fleet service" in text, text[-2000:]
