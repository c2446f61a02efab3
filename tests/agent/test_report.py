"""The device's side of the fleet loop: the enrolment record, the signed report, the counter,
the bounded queue and ``edgepack-agent report`` (against a real loopback fleet stand-in)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_agent import config, report
from device_agent import enroll as enroll_mod
from device_agent import status as status_mod
from edgepack import fleetreport
from tests.agent._fleetserver import FleetServer, identity_of
from tests.agent._support import MODEL, World, fast_limits, run_agent
from tests.agent.conftest import poll


@pytest.fixture
def fleet() -> Iterator[FleetServer]:
    server = FleetServer()
    yield server
    server.stop()


def _enroll(world: World, data: Path, fleet_url: str | None, **limits: float) -> None:
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


def _enroll_cli(world: World, data: Path, *extra: str) -> tuple[int, str, str]:
    out = run_agent(
        "enroll",
        "--repo-url",
        world.server.url,
        "--root",
        str(world.root_json),
        "--model",
        MODEL,
        "--trust",
        str(world.producer_pub),
        "--recipient-key",
        str(world.fleet_key_path),
        "--data-dir",
        str(data),
        *extra,
    )
    return out.returncode, out.stdout, out.stderr


def _queue(data: Path) -> list[Path]:
    return sorted(report.queue_dir(data).glob("*.json"))


# -- enrolment ------------------------------------------------------------------------------
def test_device_id_is_fleetreports_and_unchanged() -> None:
    """The agent and the service derive the same id, byte for byte, as before."""
    raw = bytes(range(32))
    expected = "dev-" + hashlib.sha256(b"edgepack-device-id\x00" + raw).hexdigest()[:20]
    assert enroll_mod.device_id_for(raw) == fleetreport.device_id_for(raw) == expected


def test_enrol_writes_a_signed_record_and_keeps_the_fleet_url(world: World, tmp_path: Path) -> None:
    data = tmp_path / "dev"
    code, out, err = _enroll_cli(world, data, "--fleet-url", "http://fleet.example:8080/", "--json")
    assert code == 0, err
    enrolled = json.loads(out)
    path = Path(enrolled["record"])
    assert path == data / "keys" / "enrolment.json"
    record = fleetreport.parse_record(path.read_bytes())  # signature and id checked
    assert record["device_id"] == enrolled["device_id"]
    assert fleetreport.identity_raw(record) == identity_of(data)
    assert record["recipient"].startswith("x25519:") and record["models"] == [MODEL]
    assert record["channel"] == "stable" and record["agent_version"]
    assert config.load(data).fleet_url == "http://fleet.example:8080"

    code, out, err = _enroll_cli(world, data, "--channel", "beta")  # no --fleet-url: kept
    assert code == 0, err
    assert "register it: edgepack fleet register " + str(path) in out
    assert config.load(data).fleet_url == "http://fleet.example:8080"
    assert fleetreport.parse_record(path.read_bytes())["channel"] == "beta"


@pytest.mark.parametrize(
    "url", ["ftp://fleet.example", "file:///srv/fleet", "http://", "fleet.example", "http://h:x"]
)
def test_a_fleet_url_no_sender_could_use_is_refused_before_anything_is_written(
    world: World, tmp_path: Path, url: str
) -> None:
    data = tmp_path / "dev"
    code, _, err = _enroll_cli(world, data, "--fleet-url", url)
    assert code == 3, err
    assert "--fleet-url" in err and len(err.strip().splitlines()) == 1
    assert not (data / "config.toml").exists() and not (data / "keys").exists()


# -- the report ---------------------------------------------------------------------------
def test_a_report_says_what_runs_is_signed_and_small(
    world: World, tmp_path: Path, fleet: FleetServer
) -> None:
    data = tmp_path / "dev"
    _enroll(world, data, fleet.url)
    world.publish("1.0.0", 2.0)
    assert poll(data).action == "installed"
    cfg = config.load(data)
    queued = report.queue_now(cfg, profile="rpi4", architecture="aarch64")
    assert len(queued.body) < 1024, len(queued.body)
    assert fleetreport.verify(identity_of(data), queued.body, queued.signature)
    assert not fleetreport.verify(identity_of(data), queued.body + b" ", queued.signature)
    doc = fleetreport.parse_report(queued.body)
    assert doc.keys() == fleetreport.REPORT_KEYS
    assert doc["device_id"] == cfg.device_id and doc["counter"] == queued.counter
    assert abs(doc["time"] - time.time()) < 60
    assert doc["profile"] == "rpi4" and doc["architecture"] == "aarch64"
    assert set(doc["runtime"]) == {"python", "onnxruntime", "cryptography", "tuf"}
    m = doc["models"][MODEL]
    assert m.keys() == fleetreport.MODEL_KEYS
    status = status_mod.load(data)["models"][MODEL]
    assert m["revision"] == status["revision"] and m["version"] == "1.0.0"
    assert m["state"] == "committed" and m["last_action"] == "installed"
    assert m["channel"] == "stable" and m["stale"] is False and m["refused"] == {}
    from edgepack.channel import rollout_bucket

    assert m["cohort_bucket"] == rollout_bucket(MODEL, "1.0.0", cfg.device_id)
    assert isinstance(m["health_latency_ms"], float) and m["health_latency_ms"] >= 0
    # The file in the queue is the header line and exactly the signed bytes.
    line, body = queued.path.read_bytes().split(b"\n", 1)
    assert line.decode() == f"{fleetreport.SIGNATURE_HEADER}: {queued.signature}"
    assert body == queued.body


def test_a_report_of_a_refused_release_stays_under_1kb(
    world: World, tmp_path: Path, fleet: FleetServer
) -> None:
    data = tmp_path / "dev"
    _enroll(world, data, fleet.url)
    world.publish("1.0.0", 2.0)
    poll(data)
    world.publish("2.0.0", 3.0, bad_golden=True)
    assert poll(data).action == "failed"
    queued = report.queue_now(config.load(data), profile="", architecture="x86_64")
    m = fleetreport.parse_report(queued.body)["models"][MODEL]
    assert m["last_action"] == "failed" and "health check" in (m["last_error"] or "")
    assert list(m["refused"]) == ["2.0.0"] and m["version"] == "1.0.0"
    assert len(queued.body) < 1024, len(queued.body)


def test_a_report_before_any_poll_is_stale_and_names_nothing(
    world: World, tmp_path: Path, fleet: FleetServer
) -> None:
    data = tmp_path / "dev"
    _enroll(world, data, fleet.url)
    queued = report.queue_now(config.load(data), profile="", architecture="x86_64")
    m = fleetreport.parse_report(queued.body)["models"][MODEL]
    assert m["revision"] is None and m["stale"] is True and m["cohort_bucket"] is None


# -- the counter --------------------------------------------------------------------------
def test_the_counter_grows_across_restarts_and_a_lost_counter_file(
    world: World, tmp_path: Path, fleet: FleetServer
) -> None:
    data = tmp_path / "dev"
    _enroll(world, data, fleet.url)
    cfg = config.load(data)
    counters = [report.queue_now(cfg, profile="", architecture="x").counter for _ in range(3)]
    counters.append(report.Queue(config.load(data)).put({"x": 1}).counter)  # a "restart"
    (report.reports_dir(data) / report.COUNTER_NAME).unlink()
    counters.append(report.queue_now(cfg, profile="", architecture="x").counter)
    for path in _queue(data):  # the file and the queue lost: the clock carries it
        path.unlink()
    (report.reports_dir(data) / report.COUNTER_NAME).unlink()
    counters.append(report.queue_now(cfg, profile="", architecture="x").counter)
    assert counters == sorted(set(counters)), counters


def test_the_counter_grows_when_the_clock_goes_back(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    first = report.next_counter(data, now_ns=2_000_000_000_000_000_000)
    assert report.next_counter(data, now_ns=1_000_000_000_000_000_000) == first + 1
    stored = int((report.reports_dir(data) / report.COUNTER_NAME).read_text())
    assert stored == first + 1  # written before any report carries it


# -- the queue bound ------------------------------------------------------------------------
def test_the_queue_keeps_the_newest_report_queue_max(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "dev"
    _enroll(world, data, "http://127.0.0.1:9", report_queue_max=5)
    queue = report.Queue(config.load(data))
    with caplog.at_level(logging.WARNING, logger="device_agent.report"):
        counters = [queue.put({"n": n}).counter for n in range(12)]
    kept = _queue(data)
    assert [int(p.stem) for p in kept] == counters[-5:]
    assert [json.loads(q.body)["n"] for q in queue.pending()] == list(range(7, 12))
    assert len([r for r in caplog.records if "report_queue_max" in r.getMessage()]) == 1


# -- `edgepack-agent report` ----------------------------------------------------------------
def test_report_command_sends_keeps_or_drops_with_its_exit_code(
    world: World, tmp_path: Path, fleet: FleetServer
) -> None:
    data = tmp_path / "dev"
    _enroll(world, data, fleet.url, report_timeout_s=2.0)
    world.publish("1.0.0", 2.0)
    poll(data)

    fleet.set("down")
    out = run_agent("report", "--json", data=data)
    assert out.returncode == 7, out.stderr
    assert json.loads(out.stdout)["kept"] == 1 and len(_queue(data)) == 1

    fleet.set("ok")  # up, but this device is not registered yet: kept
    out = run_agent("report", data=data)
    assert out.returncode == 7 and "registered" in out.stdout, out.stdout
    assert len(_queue(data)) == 2

    fleet.register(data)
    out = run_agent("report", "--json", data=data)
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["sent"] == 3 and _queue(data) == []
    taken = fleet.taken()
    assert [r["counter"] for r in taken] == sorted({r["counter"] for r in taken})
    assert taken[-1]["models"][MODEL]["version"] == "1.0.0"

    out = run_agent("report", "--no-send", data=data)
    assert out.returncode == 0 and len(_queue(data)) == 1

    fleet.set("409")  # the service will never take it: dropped, said on stderr
    out = run_agent("report", data=data)
    assert out.returncode == 1, out.stderr
    assert "refused report" in out.stderr and "mode 409" in out.stderr
    assert _queue(data) == []


def test_report_command_without_a_fleet_is_a_usage_error(world: World, tmp_path: Path) -> None:
    data = tmp_path / "dev"
    _enroll(world, data, None)
    out = run_agent("report", data=data)
    assert out.returncode == 2
    assert "--fleet-url" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not report.queue_dir(data).exists()


def test_a_daemon_with_an_unusable_fleet_url_updates_without_reporting(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A hand-edited fleet_url no sender could use: said once at start, no reporter."""
    import threading

    from device_agent.agent import Agent
    from device_agent.cli import _start_reporter

    data = tmp_path / "dev"
    _enroll(world, data, "http://fleet.example")
    path = data / "config.toml"
    path.write_text(path.read_text().replace("http://fleet.example", "ftp://fleet.example"))
    with caplog.at_level(logging.ERROR):
        hook = _start_reporter(Agent(config.load(data)), threading.Event())
    assert hook is None
    assert any("not reporting to the fleet" in r.getMessage() for r in caplog.records)
    world.publish("1.0.0", 2.0)
    assert poll(data).action == "installed"
