"""The agent's log lines on stderr, from the real ``edgepack-agent`` program: the daemon
through an install, an operator rollback and a dead server; ``-q``, ``--log-level``
and the journal's priority prefixes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.agent._support import MODEL, World, fast_limits

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEPACK_", "JOURNAL_"))}
    env.update(extra)
    return env


def once(data: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "device_agent", *args, "run", "--once", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        env=_env(**env),
        timeout=120,
        cwd=ROOT,
    )


def wait_for(what: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def running_version(data: Path) -> str | None:
    try:
        doc = json.loads((data / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    version: str | None = doc["models"][MODEL]["version"]
    return version


def test_daemon_logs_install_rollback_and_transport_failure(world: World, tmp_path: Path) -> None:
    data = tmp_path / "dev"
    world.enroll(data, limits=fast_limits(poll_interval_s=0.3, poll_jitter=0.0, backoff_max_s=0.6))
    world.publish("1.0.0", 2.0)
    log_path = tmp_path / "stderr.log"
    with open(log_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "device_agent", "run", "--data-dir", str(data)],
            env=_env(),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        wait_for(lambda: running_version(data) == "1.0.0")
        world.publish("1.1.0", 3.0)
        wait_for(lambda: running_version(data) == "1.1.0")
        world.repo.rollback()  # the operator moves the channel back to 1.0.0
        wait_for(lambda: running_version(data) == "1.0.0")
        world.repo.revoke("1.1.0")
        wait_for(lambda: "revokes 1.1.0" in log_path.read_text())
        world.server.stop()
        wait_for(lambda: "Connection refused" in log_path.read_text())
        time.sleep(2.0)  # several failed polls: the same reason is said once at WARNING
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert stdout == ""  # the daemon's output is its log, on stderr
    lines = log_path.read_text().splitlines()
    text = "\n".join(lines)
    assert "Traceback" not in text
    assert all(line.startswith("edgepack-agent: ") for line in lines), text
    assert lines[0].startswith(f"edgepack-agent: info: started: following {MODEL} on channel")
    assert lines[-1] == "edgepack-agent: info: stopped"
    rev = r"\d\.\d\.\d-[0-9a-f]{12}"
    expected = [
        rf"info: {MODEL}: downloading models/{MODEL}/{MODEL}-1\.0\.0-any\.epk \(\d+ bytes\)",
        rf"info: {MODEL}: downloaded models/{MODEL}/{MODEL}-1\.0\.0-any\.epk",
        rf"info: {MODEL}: 1\.0\.0-[0-9a-f]{{12}} passed its health check",
        rf"info: {MODEL}: installed 1\.0\.0-[0-9a-f]{{12}} \(was nothing\)",
        rf"info: {MODEL}: installed 1\.1\.0-[0-9a-f]{{12}} \(was 1\.0\.0-[0-9a-f]{{12}}\)",
        rf"info: {MODEL}: rolled back to 1\.0\.0-[0-9a-f]{{12}} \(was 1\.1\.0-[0-9a-f]{{12}}\): "
        r"the channel names 1\.0\.0 again",
        rf"warning: {MODEL}: the channel revokes 1\.1\.0; it is never installed again",
        r"warning: repository metadata unavailable or expired: .*Connection refused.*; "
        r"the running models keep running",
    ]
    for pattern in expected:
        assert re.search(pattern, text), (pattern, text)
    assert re.search(rf"{MODEL}: installed {rev}", text)
    refused = [line for line in lines if "Connection refused" in line]
    assert len(refused) == 1, refused  # several polls failed so; said once
    backoff = [line for line in lines if "next poll in" in line]
    assert len(backoff) == 1 and "back-off after 1 failed poll" in backoff[0]


def test_quiet_silences_info_and_debug_shows_more(world: World, data: Path) -> None:
    world.publish("1.0.0", 2.0)
    quiet = once(data, "-q")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.startswith(f"{MODEL}: installed 1.0.0-")
    assert quiet.stderr == ""
    debug = once(data, "--log-level", "debug")
    assert debug.returncode == 0
    assert f"edgepack-agent: debug: {MODEL}: up-to-date 1.0.0-" in debug.stderr
    normal = once(data)
    assert normal.stderr == ""  # nothing moved: nothing said at INFO
    verbose = once(data, "-v")
    assert "debug:" in verbose.stderr
    from_env = once(data, EDGEPACK_LOG_LEVEL="debug")  # a unit's Environment= line
    assert f"edgepack-agent: debug: {MODEL}: up-to-date 1.0.0-" in from_env.stderr
    bad = once(data, "--log-level", "loud")
    assert bad.returncode == 3 and "unknown log level 'loud'" in bad.stderr


def test_quiet_still_says_a_refusal(world: World, data: Path) -> None:
    world.publish("1.0.0", 2.0, bad_golden=True)
    out = once(data, "-q")
    assert out.returncode == 4
    assert re.fullmatch(
        rf"edgepack-agent: error: {MODEL}: failed 1\.0\.0 \(health check[^\n]*; no model running\n",
        out.stderr,
    ), out.stderr
    assert once(data, "-qq").stderr == ""  # -qq: errors only; the repeat is a "kept" warning


def run_into_journal(data: Path, err_path: Path) -> int:
    """``run --once`` with stderr a file that JOURNAL_STREAM names, as systemd does."""
    with open(err_path, "w") as err:
        st = os.fstat(err.fileno())
        return subprocess.run(
            [sys.executable, "-m", "device_agent", "run", "--once", "--data-dir", str(data)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=_env(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}"),
            timeout=120,
            cwd=ROOT,
        ).returncode


def test_journal_lines_carry_priorities(world: World, data: Path, tmp_path: Path) -> None:
    world.publish("1.0.0", 2.0)
    err_path = tmp_path / "journal.log"
    assert run_into_journal(data, err_path) == 0
    lines = err_path.read_text().splitlines()
    assert lines and all(re.match(r"<[2-7]>", line) for line in lines), lines
    assert any(
        re.fullmatch(rf"<6>{MODEL}: installed 1\.0\.0-[0-9a-f]{{12}} \(was nothing\)", x)
        for x in lines
    )
    (data / "config.toml").write_text("not toml [")  # the error line of the CLI itself
    assert run_into_journal(data, err_path) == 3
    assert err_path.read_text().startswith("<3>edgepack-agent: error: "), err_path.read_text()
    world.enroll(data)
    world.server.stop()
    assert run_into_journal(data, err_path) == 7
    assert err_path.read_text().startswith("<4>repository metadata unavailable")
    # A JOURNAL_STREAM inherited by a process whose stderr went elsewhere does not count.
    other = once(data, JOURNAL_STREAM="1:2")
    assert other.stderr.startswith("edgepack-agent: warning: repository metadata unavailable")


def test_a_tls_failure_is_logged_with_its_reason(world: World, tmp_path: Path) -> None:
    from tests.agent.test_fetcher_http import Loopback, PrivateCA

    ca = PrivateCA(tmp_path / "pki")
    server = Loopback(lambda h: h.send_bytes(b"{}"), ca.server_context)
    try:
        data = tmp_path / "dev"
        world.enroll(data, url=server.url)  # a CA the device was not told to trust
        out = once(data)
    finally:
        server.stop()
    assert out.returncode == 7, out.stderr
    assert re.fullmatch(
        r"edgepack-agent: warning: repository metadata unavailable or expired: "
        r"[^\n]*CERTIFICATE_VERIFY_FAILED[^\n]*; the running models keep running\n",
        out.stderr,
    ), out.stderr
