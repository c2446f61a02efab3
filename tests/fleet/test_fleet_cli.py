"""``edgepack fleet`` commands as an operator runs them: a subprocess each, a real store, real
enrolment records signed by fresh Ed25519 keys, and ``fleet serve`` as a real process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import urllib3

from edgepack import fleetreport
from edgepack.fleet import ingest
from edgepack.fleet.sql import open_store
from tests.fleet._devices import FakeDevice, model_entry


def edgepack(*args: str, check: int | None = 0) -> subprocess.CompletedProcess[str]:
    """Run ``edgepack ARGS``; check its exit code unless ``check`` is None."""
    env = {**os.environ, "EDGEPACK_FLEET_DB": "sqlite:////nonexistent/never-used.db"}
    done = subprocess.run(
        [sys.executable, "-m", "edgepack.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    if check is not None:
        assert done.returncode == check, (done.returncode, done.stdout, done.stderr)
    return done


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The single error line of a failed command (no traceback)."""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert lines[0].startswith("edgepack: error: ")
    return lines[0]


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleet.db'}"


def write_record(tmp_path: Path, device: FakeDevice, record: dict[str, Any] | None = None) -> Path:
    path = tmp_path / f"{device.device_id}.json"
    path.write_bytes(fleetreport.canonical(record or device.record()))
    return path


def report(db: str, device: FakeDevice, models: dict[str, dict[str, Any]] | None = None) -> None:
    """Ingest a signed report of ``device`` as the service would."""
    store = open_store(db)
    try:
        body = device.report(models)
        ingest.ingest(store, body, device.sign(body), now=time.time())
    finally:
        store.close()


def test_register_devices_show_status_on_both_backends(store_url: str, tmp_path: Path) -> None:
    device = FakeDevice()
    record = write_record(tmp_path, device)
    done = edgepack("fleet", "register", str(record), "--db", store_url)
    assert done.stdout.strip() == f"registered {device.device_id} (detector on stable)"
    again = json.loads(
        edgepack("fleet", "register", str(record), "--db", store_url, "--json").stdout
    )
    assert again == {"device_id": device.device_id, "created": False, "models": ["detector"]}

    report(store_url, device)
    devices = json.loads(edgepack("fleet", "devices", "--db", store_url, "--json").stdout)
    assert [d["device_id"] for d in devices["devices"]] == [device.device_id]
    assert devices["devices"][0]["last_counter"] == 1

    shown = json.loads(
        edgepack("fleet", "show", device.device_id, "--db", store_url, "--json").stdout
    )
    assert shown["device"]["identity"] == "ed25519:" + fleetreport.public_raw(device.key).hex()
    assert shown["last_report"]["models"]["detector"]["version"] == "1.0.0"

    status = json.loads(edgepack("fleet", "status", "--db", store_url, "--json").stdout)
    (release,) = status["releases"]
    assert (release["model"], release["version"], release["running"]) == ("detector", "1.0.0", 1)
    assert status["unseen"] == []


@pytest.mark.parametrize(
    "case",
    ["tampered", "not-json", "wrong-id", "missing", "too-large"],
)
def test_a_bad_record_is_one_line_and_registers_nothing(db: str, tmp_path: Path, case: str) -> None:
    device = FakeDevice()
    record = device.record()
    path = tmp_path / "record.json"
    if case == "tampered":
        record["channel"] = "beta"  # changed after the device signed it
        path.write_bytes(fleetreport.canonical(record))
    elif case == "not-json":
        path.write_bytes(b"\x00garbage{")
    elif case == "wrong-id":
        record = fleetreport.make_record(
            device.key,
            {
                **{
                    k: record[k]
                    for k in record
                    if k not in ("format", "format_version", "signature")
                },
                "device_id": FakeDevice().device_id,
            },
        )
        path.write_bytes(fleetreport.canonical(record))
    elif case == "too-large":
        path.write_bytes(b" " * (fleetreport.MAX_RECORD_BYTES + 10))
    done = edgepack("fleet", "register", str(path), "--db", db, check=3)
    one_line_error(done)
    assert done.stdout == ""
    assert json.loads(edgepack("fleet", "devices", "--db", db, "--json").stdout) == {"devices": []}


def test_status_exits_4_on_failed_devices_and_prints_a_narrow_table(
    db: str, tmp_path: Path
) -> None:
    good, bad, silent = FakeDevice(), FakeDevice(), FakeDevice()
    for d in (good, bad, silent):
        edgepack("fleet", "register", str(write_record(tmp_path, d)), "--db", db)
    report(db, good, {"detector": model_entry(version="1.0.0")})
    healthy = edgepack("fleet", "status", "--db", db)
    assert "detector on stable" in healthy.stdout
    assert "2 unseen" in healthy.stdout and silent.device_id in healthy.stdout

    report(
        db,
        bad,
        {
            "detector": model_entry(
                version="1.0.0",
                refused={"2.0.0": "health check failed: 812 ms over the 200 ms budget"},
            )
        },
    )
    done = edgepack("fleet", "status", "--db", db, "--model", "detector", check=4)
    assert "2.0.0" in done.stdout and "health check failed" in done.stdout
    assert max(len(line) for line in done.stdout.splitlines()) <= 100
    assert "detector/stable 2.0.0 (1)" in one_line_error(done)
    as_json = edgepack("fleet", "status", "--db", db, "--json", check=4)
    releases = {r["version"]: r for r in json.loads(as_json.stdout)["releases"]}
    assert releases["2.0.0"]["failed"] == {"health check failed": 1}
    # Another model's view has no failure.
    edgepack("fleet", "status", "--db", db, "--model", "other")
    bad_option = edgepack("fleet", "status", "--db", db, "--stale-after", "soon", check=2)
    assert "--stale-after" in one_line_error(bad_option)


def test_revoke_device(db: str, tmp_path: Path) -> None:
    device = FakeDevice()
    edgepack("fleet", "register", str(write_record(tmp_path, device)), "--db", db)
    done = edgepack("fleet", "revoke-device", device.device_id, "--reason", "stolen", "--db", db)
    assert done.stdout.strip() == f"revoked {device.device_id}"
    shown = json.loads(edgepack("fleet", "show", device.device_id, "--db", db, "--json").stdout)
    assert shown["device"]["revoked_reason"] == "stolen"
    human = edgepack("fleet", "devices", "--db", db).stdout
    assert "revoked: stolen" in human
    unknown = edgepack("fleet", "revoke-device", "dev-" + "0" * 20, "--db", db, check=3)
    assert "not registered" in one_line_error(unknown)
    missing = edgepack("fleet", "show", "dev-" + "1" * 20, "--db", db, check=3)
    one_line_error(missing)


def test_token_is_0600_and_never_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "operator.token"
    edgepack("fleet", "token", "--out", str(out))
    assert out.stat().st_mode & 0o777 == 0o600
    token = out.read_text()
    assert len(token.strip()) >= 40
    again = edgepack("fleet", "token", "--out", str(out), check=3)
    assert "refusing to overwrite" in one_line_error(again)
    assert out.read_text() == token


def test_serve_takes_reports_and_stops_cleanly_on_sigterm(db: str, tmp_path: Path) -> None:
    token_file = tmp_path / "operator.token"
    edgepack("fleet", "token", "--out", str(token_file))
    token = token_file.read_text().strip()
    device = FakeDevice()
    edgepack("fleet", "register", str(write_record(tmp_path, device)), "--db", db)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgepack.cli",
            "fleet",
            "serve",
            "--db",
            db,
            "--port",
            "0",
            "--token-file",
            str(token_file),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("fleet service on http://127.0.0.1:"), line
        assert line.endswith(f"({db})")
        base = line.split()[3]
        http = urllib3.PoolManager(retries=False, timeout=10)
        body = device.report()
        sent = http.request(
            "POST",
            base + "/v1/reports",
            body=body,
            headers={fleetreport.SIGNATURE_HEADER: device.sign(body)},
        )
        assert (sent.status, sent.json()) == (202, {"accepted": 1})
        status = http.request(
            "GET", base + "/v1/status", headers={"Authorization": f"Bearer {token}"}
        )
        assert status.json()["releases"][0]["running"] == 1
        assert http.request("GET", base + "/v1/status").status == 401
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_refuses_a_readable_token_file(db: str, tmp_path: Path) -> None:
    token_file = tmp_path / "operator.token"
    token_file.write_text("a-token-of-enough-length-here\n")
    token_file.chmod(0o644)
    done = edgepack(
        "fleet", "serve", "--db", db, "--port", "0", "--token-file", str(token_file), check=5
    )
    assert "readable by other users" in one_line_error(done)
    empty = tmp_path / "empty.token"
    empty.write_text("# nothing\n")
    empty.chmod(0o600)
    done = edgepack(
        "fleet", "serve", "--db", db, "--port", "0", "--token-file", str(empty), check=5
    )
    assert "holds no token" in one_line_error(done)


def test_serve_on_a_port_in_use_is_one_line(db: str, tmp_path: Path) -> None:
    token_file = tmp_path / "operator.token"
    edgepack("fleet", "token", "--out", str(token_file))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        done = edgepack(
            "fleet", "serve", "--db", db, "--port", port, "--token-file", str(token_file), check=1
        )
    assert "cannot listen on 127.0.0.1:" in one_line_error(done)
