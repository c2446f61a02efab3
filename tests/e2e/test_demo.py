"""``make demo`` keeps working: the narrated demo runs non-interactively, passes, and tidies up."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

DEMO_TIMEOUT_S = 400
SERVE_PATTERN = "edgepack.cli (repo|fleet) serve"  # pgrep -f takes an extended regex


def pgrep(*args: str) -> set[int]:
    """PIDs ``pgrep ARGS`` finds (empty when none)."""
    proc = subprocess.run(["pgrep", *args], capture_output=True, text=True, check=False)
    assert proc.returncode in (0, 1), proc.stderr
    return {int(pid) for pid in proc.stdout.split()}


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""  # it ended meanwhile


@pytest.mark.slow
def test_demo_runs_end_to_end_and_leaves_nothing_behind(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"  # the demo's TMPDIR: its work directory must vanish from here
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp), COLUMNS="300", PYTHONUNBUFFERED="1")
    for var in ("KEEP", "EDGEPACK_DEMO_PROFILES", "EDGEPACK_DEMO_QUANTIZE", "EDGEPACK_DATA_DIR"):
        env.pop(var, None)  # the demo's defaults, as `make demo` runs it
    servers_before = pgrep("-f", SERVE_PATTERN)

    proc = subprocess.Popen(
        [sys.executable, "-m", "edgepack.demo"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its session id is its pid: every descendant stays findable
    )
    try:
        out, _ = proc.communicate(timeout=DEMO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the demo took more than {DEMO_TIMEOUT_S} s:\n{out[-4000:]}")
    tail = out[-6000:]

    # Nothing left running: no process of the demo's session, no repository server of its.
    leftovers = {p: cmdline(p) for p in pgrep("-s", str(proc.pid))}
    ours = {p for p in pgrep("-f", SERVE_PATTERN) - servers_before if str(tmp) in cmdline(p)}
    if leftovers:  # stop what the demo left behind (its own process group) before failing
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert not leftovers, f"the demo left {sorted(leftovers.values())} running"
    assert not ours, f"the demo left its repository or fleet server running: {ours}"

    assert proc.returncode == 0, f"the demo exited {proc.returncode}:\n{tail}"
    assert "demo failed" not in out, tail
    assert "Warning" not in out, tail  # e.g. scikit-learn's ConvergenceWarning in the story
    assert re.search(r"demo finished in \d+ s", out), tail

    # It worked in the temporary directory it announced, and removed it.
    workdirs = set(re.findall(rf"({re.escape(str(tmp))}/edgepack-demo-[^/\s]+)", out))
    assert len(workdirs) == 1, f"the demo did not announce one work directory:\n{tail}"
    assert not any(tmp.glob("edgepack-demo-*")), "the demo left its work directory behind"
    assert not Path(workdirs.pop()).exists()

    # Two devices installed v1 and ran it on a real digit, correctly.
    predictions = re.findall(r"(device-[ab]): predicted (\d), true (\d)", out)
    assert {d for d, _, _ in predictions} == {"device-a", "device-b"}, tail
    assert all(p == t for _, p, t in predictions), predictions
    # The broken v2, at a watched partial rollout, reached one device; its health check
    # refused it (v1 kept), the device's signed report put the failure in `fleet status`,
    # and `fleet watch` halted the rollout before it reached the other device.
    refusals = re.findall(
        r"device-[ab]: digits: failed 2\.0\.0 \(.*health check failed.*\); running 1\.0\.0-", out
    )
    assert len(refusals) == 1, tail
    assert out.count("the health check refused v2, v1 kept") == 1, tail
    assert re.search(
        r"digits 2\.0\.0 on stable\s*│\s*0\s*│\s*1 \(health check failed\)\s*│\s*100%", out
    ), out
    assert re.search(r"fleet watch: halt digits 2\.0\.0: 1 of 1 fresh devices failed", out), out
    assert out.count("the halted rollout never reached it") == 1, out
    # The closing table is the fleet service's: both devices reported, both run v1.
    closing = out[out.index("the fleet now (edgepack fleet status)") :]
    assert re.search(r"device-a\s*│[^│]*│\s*1\.0\.0\s*│\s*\d+ s ago", closing), closing
    assert re.search(r"device-b\s*│[^│]*│\s*1\.0\.0\s*│\s*\d+ s ago", closing), closing
    # v3 reached exactly one device; the operator rollback sent it back to v1 from cache.
    assert len(re.findall(r"device-[ab]: digits: installed 3\.0\.0-", out)) == 1, tail
    assert len(re.findall(r"device-[ab]: digits: rolled-back 1\.0\.0-", out)) == 1, tail
    runs = re.findall(r"(device-[ab]) runs (\d+\.\d+\.\d+)", out)
    assert [v for _, v in runs].count("3.0.0") == 1, runs
    assert sorted(runs[-2:]) == [("device-a", "1.0.0"), ("device-b", "1.0.0")], runs
