"""The ``edgepack-agent`` commands, run as the real console program."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.agent._support import MODEL, World, run_agent


def agent(*args: str, env_data: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run_agent(*args, data=env_data)


def test_enroll_run_status_list_revert(world: World, tmp_path: Path) -> None:
    data = tmp_path / "dev"
    world.publish("1.0.0", 2.0)
    out = agent(
        "enroll",
        "--repo-url",
        world.server.url,
        "--root",
        str(world.root_json),
        "--model",
        MODEL,
        "--trust",
        str(world.producer_pub),
        "--data-dir",
        str(data),
        "--json",
    )
    assert out.returncode == 0, out.stderr
    enrolled = json.loads(out.stdout)
    assert enrolled["device_id"].startswith("dev-")
    pub = Path(enrolled["public_key"])
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert (data / "keys" / "device.key").stat().st_mode & 0o777 == 0o600
    # the device's own key is not a recipient of this bundle yet, and the repository holds
    # no key envelope for it: nothing is installed, the poll says why (and tries again later)
    out = agent("run", "--once", "--json", env_data=data)
    assert out.returncode == 4, out.stderr  # a release it cannot decrypt
    first = json.loads(out.stdout)[0]
    assert first["action"] == "error" and "no key envelope" in first["error"]
    # re-enrol with the fleet key (same data dir): installs
    out = agent(
        "enroll",
        "--repo-url",
        world.server.url,
        "--root",
        str(world.root_json),
        "--model",
        MODEL,
        "--trust",
        str(world.producer_pub),
        "--data-dir",
        str(data),
        "--recipient-key",
        str(world.fleet_key_path),
    )
    assert out.returncode == 0, out.stderr
    world.publish("1.0.1", 2.5)
    assert json.loads(agent("run", "--once", "--json", env_data=data).stdout)[0]["action"] == (
        "installed"
    )
    world.publish("2.0.0", 3.0)
    assert agent("run", "--once", env_data=data).returncode == 0
    status = json.loads(agent("status", "--json", env_data=data).stdout)
    assert status["models"][MODEL]["version"] == "2.0.0"
    listed = json.loads(agent("list", MODEL, "--json", "--data-dir", str(data)).stdout)
    assert [r["active"] for r in listed[MODEL]] == [False, True]
    out = agent("revert", MODEL, "--json", env_data=data)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["revision"].startswith("1.0.1-")
    out = agent("revert", MODEL, env_data=data)  # nothing earlier is known good now
    assert out.returncode == 3 and "error:" in out.stderr and "\n" not in out.stderr.strip()


def test_not_enrolled_is_one_clear_line(tmp_path: Path) -> None:
    out = agent("status", "--data-dir", str(tmp_path / "nothing"))
    assert out.returncode == 3
    assert "enroll" in out.stderr and out.stderr.count("\n") == 1


def test_run_daemon_polls_and_stops_on_sigterm(world: World, tmp_path: Path) -> None:
    import signal
    import time

    data = tmp_path / "dev"
    world.enroll(data)
    world.publish("1.0.0", 2.0)
    env = dict(os.environ, EDGEPACK_DATA_DIR=str(data))
    proc = subprocess.Popen(
        [sys.executable, "-m", "device_agent", "run"],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not (data / "status.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        status = json.loads((data / "status.json").read_text())
        assert status["models"][MODEL]["version"] == "1.0.0"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_enroll_checks_the_named_profile(world: World, tmp_path: Path) -> None:
    """An unknown profile is refused before anything is written; a foreign one is enrolled with a warning."""
    import platform

    common = [
        "--repo-url",
        world.server.url,
        "--root",
        str(world.root_json),
        "--model",
        MODEL,
        "--json",
    ]
    data = tmp_path / "dev"
    out = agent("enroll", *common, "--profile", "toaster-9000", "--data-dir", str(data))
    assert out.returncode == 3
    assert "toaster-9000" in out.stderr and "Traceback" not in out.stderr
    assert not data.exists()
    foreign = "raspberry-pi-4" if platform.machine() in ("x86_64", "AMD64") else "intel-nuc"
    out = agent("enroll", *common, "--profile", foreign, "--data-dir", str(data))
    assert out.returncode == 0, out.stderr
    assert "warning:" in out.stderr and "--profile auto" in out.stderr
    assert json.loads(out.stdout)["warnings"]


def test_enroll_without_a_model_is_refused_before_anything_is_written(
    world: World, tmp_path: Path
) -> None:
    data = tmp_path / "dev"
    common = ["--repo-url", world.server.url, "--root", str(world.root_json)]
    out = agent("enroll", *common, "--data-dir", str(data))
    assert out.returncode == 2 and "--model" in out.stderr and "Traceback" not in out.stderr
    assert not data.exists()

    from device_agent.enroll import enroll
    from edgepack.errors import InvalidInputError

    try:
        enroll(data, repo_url=world.server.url, root=world.root_json, models=[])
    except InvalidInputError as exc:
        assert "--model" in str(exc)
    else:
        raise AssertionError("enroll() accepted a device that follows no model")
    assert not data.exists()
