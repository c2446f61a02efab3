"""A running daemon and the local verdicts (revert, report-bad, confirm) given beside it.

The daemon (`edgepack-agent run`, a real process polling every second) must
act on what a verdict wrote, not on the journal it read when it started: a
reverted release stays reverted, a confirmed one is not rolled back at its
deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from device_agent.state import Journal
from tests.agent._support import MODEL, World, fast_limits
from tests.agent.test_cli import agent

CHECKOUT = Path(__file__).resolve().parents[2]


def _status(data: Path) -> dict[str, Any]:
    try:
        doc = json.loads((data / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    model: dict[str, Any] = doc.get("models", {}).get(MODEL, {})
    return model


def _wait(what: str, until: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _wait_polls(data: Path, count: int) -> None:
    """Let the daemon finish ``count`` more polls (each rewrites last_attempt)."""
    for _ in range(count):
        before = _status(data).get("last_attempt")
        _wait("the next poll", lambda b=before: _status(data).get("last_attempt") != b)  # type: ignore[misc]


@contextmanager
def daemon(data: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = dict(os.environ, EDGEPACK_DATA_DIR=str(data))
    proc = subprocess.Popen(
        [sys.executable, "-m", "device_agent", "run"],
        env=env,
        cwd=CHECKOUT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _running(data: Path, version: str) -> Callable[[], bool]:
    return lambda: _status(data).get("version") == version


def _v1_then_v2(world: World, data: Path) -> None:
    """With the daemon running: v1 installed, then v2 installed over it."""
    world.publish("1.0.0", 2.0)
    _wait("v1 installed", _running(data, "1.0.0"))
    world.publish("2.0.0", 3.0)
    _wait("v2 installed", _running(data, "2.0.0"))


def _revisions(data: Path) -> list[str]:
    root = data / "models" / MODEL
    return sorted(
        p.name.split("-")[0]
        for p in root.iterdir()
        if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
    )


@pytest.mark.parametrize("verdict", ["revert", "report-bad"])
def test_a_rollback_verdict_stays_done_while_the_daemon_polls(
    world: World, tmp_path: Path, verdict: str
) -> None:
    data = tmp_path / "dev"
    world.enroll(data, fast_limits(poll_interval_s=1.0, poll_jitter=0.0, confirm_window_s=3600.0))
    with daemon(data):
        _v1_then_v2(world, data)
        out = agent(verdict, MODEL, "--data-dir", str(data))
        assert out.returncode == 0, out.stderr
        world.server.requests.clear()
        _wait_polls(data, 3)
        assert _status(data).get("version") == "1.0.0", _status(data)
        assert "2.0.0" in Journal.load(data).model(MODEL).failed
        assert world.server.bundle_requests() == []  # the reverted release is not refetched
    # Both revisions are still on disk: nothing was deleted and reinstalled.
    assert _revisions(data) == ["1.0.0", "2.0.0"]


def test_a_confirmed_release_is_not_rolled_back_at_its_deadline(
    world: World, tmp_path: Path
) -> None:
    data = tmp_path / "dev"
    window = 10.0
    world.enroll(data, fast_limits(poll_interval_s=1.0, poll_jitter=0.0, confirm_window_s=window))
    with daemon(data):
        _v1_then_v2(world, data)
        out = agent("confirm", MODEL, "--data-dir", str(data))
        assert out.returncode == 0, out.stderr
        time.sleep(window)  # past the deadline the daemon would have rolled back
        _wait_polls(data, 2)
        assert _status(data).get("version") == "2.0.0", _status(data)
        assert Journal.load(data).model(MODEL).failed == {}
    assert _revisions(data) == ["1.0.0", "2.0.0"]
