"""Benchmark the device agent: idle RSS, a poll with nothing new, install vs download+sha256,
and an operator rollback to a cached revision.

Run: ``.venv/bin/python benchmarks/bench_agent.py [--sizes-mb 100,1000] [--at-rest plain]``. Everything is
real: a TUF repository served by ``python -m http.server`` on 127.0.0.1 (a separate
process, the same server for the baseline and the agent), real bundles, onnxruntime.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from device_agent import config, loop  # noqa: E402
from device_agent.agent import Agent  # noqa: E402
from device_agent.config import Limits  # noqa: E402
from device_agent.slots import Slots  # noqa: E402
from edgepack import bundle  # noqa: E402
from edgepack.signing import ProducerKeySigner  # noqa: E402
from tests.agent._support import MODEL, World  # noqa: E402

ROWS = 256  # floats per row of the big embedding table


def big_model_dir(dest: Path, size_mb: int) -> dict[str, Any]:
    """model.onnx (a Gather over an external-data table of ``size_mb``) + its health set."""
    dest.mkdir(parents=True)
    rows = max(1, size_mb * 1024 * 1024 // (ROWS * 4))
    with open(dest / "table.bin", "wb") as fh:
        left = rows * ROWS * 4
        while left:
            n = min(left, 64 * 1024 * 1024)
            fh.write(os.urandom(n))
            left -= n
    table = TensorProto(name="T", data_type=TensorProto.FLOAT, dims=[rows, ROWS])
    table.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "table.bin"), ("offset", "0"), ("length", str(rows * ROWS * 4))):
        e = table.external_data.add()
        e.key, e.value = k, v
    idx = helper.make_tensor_value_info("I", TensorProto.INT64, [4])
    out = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4, ROWS])
    graph = helper.make_graph(
        [helper.make_node("Gather", ["T", "I"], ["Y"])], "g", [idx], [out], [table]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (dest / "model.onnx").write_bytes(model.SerializeToString())
    sess = ort.InferenceSession(str(dest / "model.onnx"), providers=["CPUExecutionProvider"])
    inp = np.array([0, 1, rows // 2, rows - 1], np.int64)
    (dest / "health").mkdir()
    np.savez(
        dest / "health" / "golden.npz", case0_in0=inp, case0_out0=sess.run(None, {"I": inp})[0]
    )
    del sess
    return {
        "file": "health/golden.npz",
        "cases": 1,
        "tolerances": {"atol": 0.0, "rtol": 0.0, "label_agreement": 1.0},
        "budgets": {"latency_ms": 5000.0, "memory_mb": 4.0 * size_mb + 1024},
    }


# One installing poll, timed inside its own process after the agent's imports.
_INSTALL = """
import json, os, resource, sys, time
from pathlib import Path
from device_agent import config, loop
from device_agent.agent import Agent
agent = Agent(config.load(Path(sys.argv[1])))
ru0 = resource.getrusage(resource.RUSAGE_SELF)
start = time.perf_counter()
if os.environ.get("BENCH_PROFILE"):
    import cProfile, pstats
    prof = cProfile.Profile()
    out = prof.runcall(loop.poll_once, agent)[0]
    pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(30)
else:
    out = loop.poll_once(agent)[0]
elapsed = time.perf_counter() - start
ru1 = resource.getrusage(resource.RUSAGE_SELF)
kids = resource.getrusage(resource.RUSAGE_CHILDREN)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork and exec, so a process
# started by this (large) script would report the script's peak as its own.
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({
    "action": out.action,
    "error": out.error,
    "install_s": elapsed,
    "cpu_s": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
    "peak_rss_mb": hwm / 1024,
    "children_peak_rss_mb": kids.ru_maxrss / 1024,
}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def plain_download(url: str) -> float:
    """Seconds to download ``url`` to a file and sha256 it in the same pass: the baseline."""
    start = time.perf_counter()
    h = hashlib.sha256()
    with urllib.request.urlopen(url) as resp, tempfile.TemporaryFile() as out:  # noqa: S310
        while block := resp.read(1024 * 1024):
            h.update(block)
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    return time.perf_counter() - start


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes-mb", default="100,1000")
    parser.add_argument("--polls", type=int, default=20)
    parser.add_argument("--at-rest", default="encrypted", choices=["encrypted", "plain"])
    parser.add_argument("--profile", default="intel-nuc")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes_mb.split(",") if s]
    results: dict[str, Any] = {}
    base = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    world = World.create(base / "world")
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            str(port),
            "--directory",
            str(base / "world" / "public"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    time.sleep(0.5)
    try:
        data = base / "data"
        # the production defaults, except a long poll interval so `run` idles
        # intel-nuc: a 1 GB model kept in memory needs its 1 GB health-check budget (the
        # generic x86_64 profile allows 512 MB); with `plain`, onnxruntime maps the file.
        world.enroll(
            data,
            Limits(poll_interval_s=3600.0),
            url=url,
            at_rest=args.at_rest,
            profile=args.profile,
        )
        world.publish("1.0.0", 2.0)
        agent = Agent(config.load(data))
        assert loop.poll_once(agent)[0].action == "installed"

        # 1. a poll with nothing new
        loop.poll_once(agent)
        walls, cpus, nbytes = [], [], []
        for _ in range(args.polls):
            b0, c0, w0 = agent.fetcher.bytes_received, time.process_time(), time.perf_counter()
            assert loop.poll_once(agent)[0].action == "up-to-date"
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
            nbytes.append(agent.fetcher.bytes_received - b0)
        results["no_change_poll"] = {
            "wall_ms_median": 1000 * float(np.median(walls)),
            "cpu_ms_median": 1000 * float(np.median(cpus)),
            "bytes": int(np.median(nbytes)),
        }

        # 2. idle RSS of `edgepack-agent run` after its first (no-change) poll
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.Popen(
            [sys.executable, "-m", "device_agent", "run", "--data-dir", str(data)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        status = data / "status.json"
        before = status.stat().st_mtime
        deadline = time.time() + 60
        while status.stat().st_mtime == before and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        results["idle_rss_mb"] = rss_mb(proc.pid)
        proc.terminate()
        proc.wait(10)

        # 3. operator rollback to the cached revision
        world.publish("2.0.0", 3.0)
        assert loop.poll_once(agent)[0].action == "installed"
        world.repo.rollback()
        start = time.perf_counter()
        out = loop.poll_once(agent)[0]
        results["rollback_s"] = time.perf_counter() - start
        assert out.action == "rolled-back", out

        # 4. install of big bundles vs download + sha256 of the same bytes
        results["install"] = []
        for i, size in enumerate(sizes):
            src = base / f"big-{size}"
            health = big_model_dir(src, size)
            packed = bundle.pack(
                src,
                base / "bundles",
                name=MODEL,
                version=f"{10 + i}.0.0",
                recipients=[world.fleet_key.public_key()],
                signer=ProducerKeySigner(world.producer_key),
                health=health,
            ).path
            shutil.rmtree(src)
            target = world.repo.add_bundle(packed, f"{10 + i}.0.0")
            info_len = packed.stat().st_size
            tfile = world.repo.delegated["team"].signed.targets[target]
            digest = tfile.hashes["sha256"]
            bundle_url = f"{url}/targets/models/{MODEL}/{digest}.{packed.name}"
            plain_download(bundle_url)  # warm the page cache the same way for both
            baselines = []
            for _ in range(2):
                os.sync()  # no dirty pages from earlier steps: each measurement pays its own writes
                baselines.append(plain_download(bundle_url))
            baseline = min(baselines)
            world.repo.promote(f"{10 + i}.0.0", target)
            os.sync()
            # The install runs in its own process (imports done before the clock starts), so
            # its peak RSS is the agent's own, not this script's model generation.
            done = subprocess.run(
                [sys.executable, "-c", _INSTALL, str(data)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            if os.environ.get("BENCH_PROFILE"):
                print(done.stderr, file=sys.stderr)
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            assert measured["action"] == "installed", measured
            elapsed = float(measured["install_s"])
            results["install"].append(
                {
                    "at_rest": args.at_rest,
                    "size_mb": size,
                    "bundle_bytes": info_len,
                    "download_sha256_s": baseline,
                    "install_s": elapsed,
                    "ratio": elapsed / baseline,
                    "install_cpu_s": measured["cpu_s"],
                    "agent_peak_rss_mb": measured["peak_rss_mb"],
                    "children_peak_rss_mb": measured["children_peak_rss_mb"],
                }
            )
            # keep the disk small: go back to the small model and drop the big revision
            world.repo.rollback("2.0.0")
            loop.poll_once(agent)
            os.remove(packed)
        results["active"] = Slots(data, MODEL).current()
    finally:
        server.terminate()
        server.wait(10)
        world.server.stop()
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
