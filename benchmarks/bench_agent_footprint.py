"""Measure the device agent's footprint: import time, idle RSS before and after an install.

Run: ``.venv/bin/python benchmarks/bench_agent_footprint.py [--runs 5]``. Everything is
real: a TUF repository served on 127.0.0.1 (tests/agent/_support.py's ``World``), a real
``edgepack-agent run`` daemon in its own process, a real bundle installed by it with
its health check. RSS is ``VmRSS`` from ``/proc/PID/status``, read once the process is
idle; the baseline is a bare ``python -c 'import time; time.sleep(9)'`` started by the
same interpreter in the same run, so the ratio is independent of the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.agent._support import World, fast_limits  # noqa: E402

IMPORTS = ["device_agent.cli", "device_agent.agent"]


def rss_mb(pid: int) -> float:
    """The resident set of process ``pid`` in MiB (``VmRSS``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def maps_onnxruntime(pid: int) -> bool:
    """True when process ``pid`` has onnxruntime's shared library mapped."""
    return "onnxruntime" in Path(f"/proc/{pid}/maps").read_text()


def import_ms(module: str, runs: int) -> dict[str, Any]:
    """Median cumulative ``-X importtime`` of ``module`` in fresh interpreters (ms)."""
    pattern = re.compile(rf"\|\s*(\d+)\s*\|\s*{re.escape(module)}$")
    times = []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", f"import {module}"],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        found = [int(m.group(1)) for m in map(pattern.search, out.stderr.splitlines()) if m]
        times.append(found[-1] / 1000)
    return {"median_ms": round(statistics.median(times), 1), "runs_ms": [round(t) for t in times]}


def wait_for(what: str, done: Callable[[], bool], timeout: float = 120.0) -> None:
    """Poll ``done`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def current_revision(data: Path) -> str | None:
    """The revision the agent's status file says is running, if any."""
    try:
        status = json.loads((data / "status.json").read_text())
    except (OSError, ValueError):
        return None
    model = status.get("models", {}).get("digits") or {}
    return model.get("revision")


def daemon_footprint(base: Path, settle_s: float) -> dict[str, Any]:
    """RSS of ``edgepack-agent run`` idle before its first install and idle after one."""
    world = World.create(base / "world")
    try:
        data = base / "data"
        world.enroll(data, fast_limits(poll_interval_s=1.0, poll_jitter=0.0))
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        baseline = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(9)"])
        daemon = subprocess.Popen(
            [sys.executable, "-m", "device_agent", "run", "--data-dir", str(data)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for("the first poll", lambda: (data / "status.json").exists())
            time.sleep(settle_s)
            result: dict[str, Any] = {
                "baseline_rss_mb": round(rss_mb(baseline.pid), 1),
                "before_install_rss_mb": round(rss_mb(daemon.pid), 1),
            }
            world.publish("1.0.0", 2.0)
            wait_for("the install", lambda: current_revision(data) is not None)
            time.sleep(settle_s)
            result["after_install_rss_mb"] = round(rss_mb(daemon.pid), 1)
            result["after_install_onnxruntime_mapped"] = maps_onnxruntime(daemon.pid)
            result["installed"] = current_revision(data)
        finally:
            daemon.terminate()
            daemon.wait(10)
            baseline.kill()
            baseline.wait(10)
    finally:
        world.server.stop()
    for key in ("before_install_rss_mb", "after_install_rss_mb"):
        result[key.replace("_mb", "_ratio")] = round(result[key] / result["baseline_rss_mb"], 2)
    return result


def main() -> None:
    """Print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="import-time runs (median)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds idle before RSS")
    args = parser.parse_args()
    results: dict[str, Any] = {m: import_ms(m, args.runs) for m in IMPORTS}
    with tempfile.TemporaryDirectory(prefix="bench-footprint-") as tmp:
        results["daemon"] = daemon_footprint(Path(tmp), args.settle)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
