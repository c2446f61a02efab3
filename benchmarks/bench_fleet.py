"""Fleet service scale: reports ingested per second (SQLite and PostgreSQL side by side),
report size, ``fleet status`` time at 10k and 100k devices, the agent's cost per report.

    .venv/bin/python benchmarks/bench_fleet.py [--reports 3000] [--clients 3] [--runs 3]
        [--sizes 10000,100000] [--skip-agent] [--skip-http]

Everything is real. A device enrolled against a TUF repository on loopback
(tests/agent/_support.py's ``World``) installs a release and refuses a broken one
with the real agent, so its report is the one ``device_agent/report.py`` builds
for a device with one model, a refused release and an error. Ingest: ``edgepack
fleet serve`` (Starlette on uvicorn) in its own process on 127.0.0.1 over a SQLite
file and over a PostgreSQL server from Debian's package (``tests/pg.py``, started
in a temporary directory, with ``fsync`` turned back on so a commit costs what it
costs in production); client processes POST reports that the devices' identity
keys signed beforehand (signing is the devices' cost), over keep-alive
connections. Each ingest rate is printed beside its baseline, measured in the same
run against the same server and clients: the rate of ``GET /healthz`` (HTTP and
the framework, no verification, no database), so the ratio says what verification
and the transactions cost. The service process's CPU time per report is read from
``/proc``. A second line: ``store.ingest`` in a loop in this process (no HTTP, no
verification), and the service's whole pipeline (``edgepack.fleet.ingest``) in a
loop, so the HTTP layer's share is known. Status: ``fleet_status`` over a fleet
bulk-loaded by ``tests/fleet/_fill.py``, beside a plain scan of the same rows.
Agent: build + sign + queue one report (``Reporter.queue_if_due``) beside one
Ed25519 signature; the RSS importing the reporting code adds; the idle RSS of
``edgepack-agent run`` without ``fleet_url``, with one (reporting to the SQLite
service), and of the agent before the fleet work (commit ``OLD_AGENT``), beside a
bare interpreter. Medians throughout; one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import multiprocessing
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: E402

from device_agent import enroll as enroll_mod  # noqa: E402
from edgepack import fleetreport  # noqa: E402
from edgepack.fleet import ingest as ingest_mod  # noqa: E402
from edgepack.fleet.sql import SQLStore, open_store  # noqa: E402
from edgepack.fleet.store import Device  # noqa: E402
from edgepack.fleet.summary import fleet_status  # noqa: E402
from tests.agent._support import MODEL, World, fast_limits  # noqa: E402
from tests.fleet._fill import fill  # noqa: E402
from tests.pg import _cluster_of, create_database, postgres_server  # noqa: E402
from tests.servers import free_port, wait_for_port  # noqa: E402

OLD_AGENT = "48b280a"
"""The last commit of ``device_agent/`` before the fleet work (no reporting code)."""
DEVICES = 300
"""Devices registered for the ingest runs (reports go round robin over them)."""
STORE_LOOP = 2000
"""Reports per in-process ingest run."""
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


# -- the real report ------------------------------------------------------------------


def run_agent(data: Path, *args: str, tree: Path = ROOT) -> None:
    """``edgepack-agent ARGS --data-dir DATA`` from ``tree`` (a failed poll is expected)."""
    subprocess.run(
        [sys.executable, "-m", "device_agent", *args, "--data-dir", str(data)],
        env=dict(os.environ, PYTHONPATH=str(tree)),
        cwd=tree,
        capture_output=True,
        check=False,
        timeout=300,
    )


def status_of(data: Path) -> dict[str, Any]:
    """The model's entry in the device's ``status.json``."""
    doc: dict[str, Any] = json.loads((data / "status.json").read_text())
    entry: dict[str, Any] = doc["models"][MODEL]
    return entry


def enroll(world: World, data: Path, fleet_url: str | None) -> None:
    """Enrol ``data`` with today's agent (reporting to ``fleet_url`` when given)."""
    enroll_mod.enroll(
        data,
        repo_url=world.server.url,
        root=world.root_json,
        models=[MODEL],
        trust=world.producer_pub,
        recipient_key=world.fleet_key_path,
        limits=fast_limits(poll_interval_s=600.0, poll_jitter=0.0),
        fleet_url=fleet_url,
    )


OLD_ENROLL = r"""
import sys
from pathlib import Path
from device_agent import enroll
from device_agent.config import Limits
data, url, root, trust, key = sys.argv[1:]
limits = Limits(connect_timeout_s=2.0, read_timeout_s=2.0, slow_grace_s=1.0, min_speed_bps=1024,
                health_latency_runs=1, chunk_bytes=65536, free_space_margin_bytes=0,
                poll_interval_s=600.0, poll_jitter=0.0)
enroll.enroll(Path(data), repo_url=url, root=Path(root), models=["digits"], trust=Path(trust),
              recipient_key=Path(key), limits=limits)
"""


def old_tree(scratch: Path) -> Path:
    """``device_agent`` and ``edgepack`` as they were at :data:`OLD_AGENT`."""
    tree = scratch / "old-tree"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", OLD_AGENT, "device_agent", "edgepack"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


@contextlib.contextmanager
def devices_in_world(scratch: Path, fleet_url: str) -> Iterator[dict[str, Path]]:
    """Three enrolled devices that installed 1.0.0 and refused a broken 2.0.0 with the
    real agent: ``plain`` (no fleet_url), ``fleet`` (reports to ``fleet_url``) and
    ``old`` (enrolled and run by the agent of :data:`OLD_AGENT`)."""
    world = World.create(scratch / "world")
    try:
        world.publish("1.0.0", 2.0)
        tree = old_tree(scratch)
        dirs = {name: scratch / f"device-{name}" for name in ("plain", "fleet", "old")}
        enroll(world, dirs["plain"], None)
        enroll(world, dirs["fleet"], fleet_url)
        subprocess.run(
            [
                *(sys.executable, "-c", OLD_ENROLL, str(dirs["old"]), world.server.url),
                *(str(world.root_json), str(world.producer_pub), str(world.fleet_key_path)),
            ],
            env=dict(os.environ, PYTHONPATH=str(tree)),
            cwd=tree,
            capture_output=True,
            check=True,
        )
        trees = {"plain": ROOT, "fleet": ROOT, "old": tree}
        for name, data in dirs.items():
            run_agent(data, "run", "--once", tree=trees[name])
        world.publish("2.0.0", 2.0, bad_golden=True)
        for name, data in dirs.items():
            run_agent(data, "run", "--once", tree=trees[name])
            entry = status_of(data)
            if entry.get("version") != "1.0.0" or "2.0.0" not in entry.get("failed_releases", {}):
                raise SystemExit(f"the {name} device did not install 1.0.0 and refuse 2.0.0")
        yield {**dirs, "old-tree": tree}
    finally:
        world.server.stop()


def real_report(data: Path) -> tuple[bytes, str]:
    """One report as the agent queues it for ``data``: its body and signature header."""
    from device_agent import config as config_mod
    from device_agent import report as report_mod
    from device_agent import status as status_mod

    cfg = config_mod.load(data)
    doc = report_mod.content(
        cfg, status_mod.load(data), profile=cfg.profile, architecture=platform.machine()
    )
    queued = report_mod.Queue(cfg).put(doc)
    queued.path.unlink()
    return queued.body, queued.signature


# -- ingest ------------------------------------------------------------------------------


class Fleet:
    """Registered devices with their keys, signing copies of one real report."""

    def __init__(self, template: bytes, n: int) -> None:
        self.template: dict[str, Any] = json.loads(template)
        self.keys = [ed25519.Ed25519PrivateKey.generate() for _ in range(n)]
        self.ids = [fleetreport.device_id_for(fleetreport.public_raw(k)) for k in self.keys]
        self.counters = [0] * n

    def register(self, url: str) -> None:
        """Register every device in the store at ``url``."""
        store = open_store(url)
        try:
            for key, device_id in zip(self.keys, self.ids, strict=True):
                store.register(
                    Device(
                        device_id=device_id,
                        identity=fleetreport.public_raw(key),
                        recipient="",
                        models=(MODEL,),
                        channel="stable",
                        cohort="",
                        profile="generic-x86_64",
                        architecture="x86_64",
                        registered_at=time.time(),
                    )
                )
        finally:
            store.close()

    def signed(self, total: int, share: int = 1) -> list[list[tuple[bytes, str]]]:
        """``total`` signed reports in ``share`` lists; a device's reports all go in one
        list, counters increasing, so no report is a replay whatever the interleaving."""
        out: list[list[tuple[bytes, str]]] = [[] for _ in range(share)]
        for i in range(total):
            d = i % len(self.keys)
            self.counters[d] += 1
            doc = {
                **self.template,
                "device_id": self.ids[d],
                "counter": self.counters[d],
                "time": round(time.time(), 3),
            }
            body = fleetreport.canonical(doc)
            out[d % share].append((body, fleetreport.sign(self.keys[d], body)))
        return out


def _client(port: int, work: list[tuple[bytes, str]] | int, results: Any) -> None:
    """One client process: POST each report (or GET /healthz ``work`` times), keep-alive."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    bad = 0
    if isinstance(work, int):
        for _ in range(work):
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            response.read()
            bad += response.status != 200
    else:
        for body, signature in work:
            conn.request(
                "POST",
                "/v1/reports",
                body=body,
                headers={
                    "Content-Type": "application/json",
                    fleetreport.SIGNATURE_HEADER: signature,
                },
            )
            response = conn.getresponse()
            response.read()
            bad += response.status != 202
    conn.close()
    times = os.times()
    results.put((bad, times.user + times.system))


def tree_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds so far of process ``pid`` and its descendants still
    running (0 for None)."""
    if pid is None:
        return 0.0
    total = 0.0
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += tree_cpu_s(int(child))
    return total


@dataclass(frozen=True)
class Rate:
    """One HTTP run: requests per second, and CPU milliseconds per request spent by the
    service's processes, the database server's and the clients'."""

    per_s: float
    server_ms: float
    db_ms: float
    client_ms: float


def http_rate(
    port: int,
    server_pid: int,
    shares: list[list[tuple[bytes, str]]] | list[int],
    db_pid: int | None = None,
) -> Rate:
    """One client process per share, each on one keep-alive connection, all at once."""
    ctx = multiprocessing.get_context("fork")
    results: Any = ctx.Queue()
    count = sum(s if isinstance(s, int) else len(s) for s in shares)
    procs = [ctx.Process(target=_client, args=(port, share, results)) for share in shares]
    cpu0, db0 = tree_cpu_s(server_pid), tree_cpu_s(db_pid)
    start = time.perf_counter()
    for p in procs:
        p.start()
    answers = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - start
    cpu, db = tree_cpu_s(server_pid) - cpu0, tree_cpu_s(db_pid) - db0
    bad = sum(a[0] for a in answers)
    if bad:
        raise SystemExit(f"{bad} of {count} requests were refused: the benchmark is wrong")
    per = 1e3 / count
    return Rate(count / elapsed, cpu * per, db * per, sum(a[1] for a in answers) * per)


def postmaster_pid(url: str) -> int | None:
    """The PostgreSQL test cluster's server process for ``url`` (None for SQLite)."""
    if url.startswith("sqlite:"):
        return None
    pid_file = _cluster_of(url).data / "postmaster.pid"
    return int(pid_file.read_text().split()[0])


@contextlib.contextmanager
def service(db: str, scratch: Path, port: int | None = None) -> Iterator[tuple[int, int]]:
    """``edgepack fleet serve`` over ``db`` on loopback (a free port unless given):
    yields (port, pid)."""
    token = scratch / "operator.token"
    if not token.exists():
        subprocess.run(
            [sys.executable, "-m", "edgepack.cli", "fleet", "token", "--out", str(token)],
            check=True,
            capture_output=True,
            env=ENV,
        )
    port = free_port() if port is None else port
    argv = [sys.executable, "-m", "edgepack.cli", "fleet", "serve", "--db", db]
    argv += ["--port", str(port), "--token-file", str(token), "--log-level", "warning"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, env=ENV)
    try:
        wait_for_port(port, timeout=30)
        yield port, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def median_of(runs: int, measure: Callable[[], float]) -> float:
    """The median of ``runs`` measurements."""
    return statistics.median(measure() for _ in range(runs))


def store_loop(url: str, fleet: Fleet, n: int, pipeline: bool) -> float:
    """Reports per second, one thread: ``store.ingest`` alone (reports parsed
    beforehand) or the service's pipeline (size, signature, lookup, parse, store)."""
    reports = fleet.signed(n)[0]
    parsed = [fleetreport.parse_report(body) for body, _ in reports]
    store = open_store(url)
    try:
        start = time.perf_counter()
        if pipeline:
            for body, signature in reports:
                ingest_mod.ingest(store, body, signature, now=time.time())
        else:
            for (body, _), report in zip(reports, parsed, strict=True):
                store.ingest(report["device_id"], report["counter"], time.time(), report, body)
        return n / (time.perf_counter() - start)
    finally:
        store.close()


def ingest_figures(
    url: str, scratch: Path, fleet: Fleet, args: argparse.Namespace
) -> dict[str, Any]:
    """Every ingest figure for one backend (medians of ``args.runs``)."""
    fleet.register(url)
    out: dict[str, Any] = {
        "store_ingest_per_s": round(
            median_of(args.runs, lambda: store_loop(url, fleet, STORE_LOOP, False))
        ),
        "pipeline_per_s": round(
            median_of(args.runs, lambda: store_loop(url, fleet, STORE_LOOP, True))
        ),
    }
    if args.skip_http:
        return out
    with service(url, scratch) as (port, pid):
        out.update(http_figures(port, pid, fleet, args, postmaster_pid(url)))
    return out


def http_figures(
    port: int, pid: int, fleet: Fleet, args: argparse.Namespace, db_pid: int | None
) -> dict[str, Any]:
    """Reports/s and, in turns with it, /healthz/s against the service at ``port``;
    the CPU each costs (medians of ``args.runs``)."""
    http_rate(port, pid, fleet.signed(300, args.clients))  # warm-up: connections, caches
    got, base = [], []
    for _ in range(args.runs):
        got.append(http_rate(port, pid, fleet.signed(args.reports, args.clients), db_pid))
        base.append(http_rate(port, pid, [args.reports // args.clients] * args.clients, db_pid))

    def med(runs: list[Rate], field: str) -> float:
        return float(statistics.median(getattr(r, field) for r in runs))

    out: dict[str, Any] = {
        "http_reports_per_s": round(med(got, "per_s")),
        "http_healthz_per_s": round(med(base, "per_s")),
        "ratio_to_healthz": round(med(got, "per_s") / med(base, "per_s"), 3),
        "cpu_ms_per_report": {
            "service": round(med(got, "server_ms"), 3),
            "database": round(med(got, "db_ms"), 3),
            "clients": round(med(got, "client_ms"), 3),
        },
        "cpu_ms_per_healthz": {
            "service": round(med(base, "server_ms"), 3),
            "clients": round(med(base, "client_ms"), 3),
        },
    }
    if db_pid is None:
        del out["cpu_ms_per_report"]["database"]
    return out


def what_if_app() -> Any:
    """The service's app as ``fleet serve`` makes it, for uvicorn's own CLI (``--factory``),
    so the what-if runs can try options ``fleet serve`` does not have (``--workers``,
    ``--http httptools``, ``--loop uvloop``). The store and token file come from
    ``BENCH_FLEET_DB`` and ``BENCH_FLEET_TOKENS``."""
    from edgepack.fleet.app import make_app
    from edgepack.fleet.serve import read_tokens

    url = os.environ["BENCH_FLEET_DB"]
    tokens = read_tokens(Path(os.environ["BENCH_FLEET_TOKENS"]))
    return make_app(lambda: open_store(url, migrate=False), operator_tokens=tokens)


@contextlib.contextmanager
def uvicorn_service(
    db: str, scratch: Path, workers: int, fast: Path | None
) -> Iterator[tuple[int, int]]:
    """The same app under ``uvicorn --workers N`` (with httptools and uvloop from the
    folder ``fast`` when given): yields (port, pid of the parent)."""
    token = scratch / "operator.token"
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "--factory", "bench_fleet:what_if_app"]
    argv += ["--app-dir", str(ROOT / "benchmarks"), "--port", str(port), "--workers", str(workers)]
    argv += ["--log-level", "warning", "--no-access-log"]
    argv += ["--http", "httptools", "--loop", "uvloop"] if fast else ["--http", "h11"]
    path = f"{fast}:{ROOT}" if fast else str(ROOT)
    env = dict(ENV, PYTHONPATH=path, BENCH_FLEET_DB=db, BENCH_FLEET_TOKENS=str(token))
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, env=env)
    try:
        wait_for_port(port, timeout=30)
        time.sleep(1.0 * workers)  # every worker up, not only the first
        yield port, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def what_if(url: str, scratch: Path, fleet: Fleet, args: argparse.Namespace) -> dict[str, Any]:
    """Reports/s and /healthz/s under uvicorn options ``fleet serve`` lacks (medians)."""
    configs: list[tuple[str, int, Path | None]] = [("workers_2_h11", 2, None)]
    if args.what_if_fast:
        fast = Path(args.what_if_fast)
        configs += [
            ("workers_1_httptools_uvloop", 1, fast),
            ("workers_2_httptools_uvloop", 2, fast),
        ]
    fleet.register(url)
    out: dict[str, Any] = {}
    for name, workers, fast_dir in configs:
        with uvicorn_service(url, scratch, workers, fast_dir) as (port, pid):
            out[name] = http_figures(port, pid, fleet, args, postmaster_pid(url))
        print(f"what-if {name}: {out[name]}", file=sys.stderr)
    return out


def durable(pg: str) -> None:
    """Restart the test cluster with ``fsync`` on: tests/pg.py starts it with fsync off
    on the command line (which ``ALTER SYSTEM`` cannot override), fine for tests but
    not for a figure a production server would be held to."""
    cluster = _cluster_of(pg)
    cluster.stop("fast")
    options = (
        f"-p {cluster.port} -k {cluster.sockets} -c listen_addresses=127.0.0.1 "
        "-c max_connections=200"
    )
    cluster.run(
        "pg_ctl", "start", "-w", "-t", "60", "-D", str(cluster.data),
        "-l", str(cluster.root / "server.log"), "-o", options,
    )  # fmt: skip
    with psycopg.connect(pg, autocommit=True) as conn:
        setting = conn.execute("SHOW fsync").fetchone()
    if setting is None or setting[0] != "on":
        raise SystemExit("could not turn fsync on in the PostgreSQL test cluster")


# -- fleet status -----------------------------------------------------------------------


def plain_scan(url: str) -> Callable[[], float]:
    """A timer of the baseline: every row of ``devices`` joined with ``model_states``,
    fetched over the driver and nothing computed."""
    sql = (
        "SELECT d.device_id, d.last_seen, s.model, s.channel, s.version, s.pending, "
        "s.refused, s.stale, s.reported_at FROM devices d "
        "LEFT JOIN model_states s ON s.device_id = d.device_id"
    )

    def timed() -> float:
        if url.startswith("sqlite:///"):
            conn: Any = sqlite3.connect(url[len("sqlite:///") :])
        else:
            conn = psycopg.connect(url)
        try:
            start = time.perf_counter()
            conn.execute(sql).fetchall()
            return time.perf_counter() - start
        finally:
            conn.close()

    return timed


def status_figures(url: str, n: int, runs: int) -> dict[str, Any]:
    """``fleet_status`` and ``edgepack fleet status`` over ``n`` devices, medians."""
    store: SQLStore = open_store(url)
    try:
        fill(store, n)
        now = time.time()

        def timed() -> float:
            start = time.perf_counter()
            fleet_status(store, now=now, stale_after_s=3600)
            return time.perf_counter() - start

        timed()  # warm-up: the database's cache, as on a service that runs
        status_s = median_of(runs, timed)
        scan_s = median_of(runs, plain_scan(url))
    finally:
        store.close()

    def cli() -> float:
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-m", "edgepack.cli", "fleet", "status", "--db", url],
            capture_output=True,
            env=ENV,
            check=False,
        )
        if out.returncode not in (0, 4):  # 4: failed devices, which the fill has
            raise SystemExit(f"fleet status failed: {out.stderr.decode()[-500:]}")
        return time.perf_counter() - start

    return {
        "fleet_status_s": round(status_s, 3),
        "plain_scan_s": round(scan_s, 3),
        "ratio_to_scan": round(status_s / scan_s, 2),
        "cli_s": round(median_of(runs, cli), 3),
    }


# -- the agent ---------------------------------------------------------------------------


AGENT_COST = r"""
import json, platform, sys, threading, time
from pathlib import Path
def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
import device_agent.cli, device_agent.agent, device_agent.loop  # what every daemon has
before = rss()
from device_agent.reporter import Reporter  # what a daemon with fleet_url adds
from device_agent import config
after = rss()
cfg = config.load(Path(sys.argv[1]))
reporter = Reporter(cfg, profile=cfg.profile, architecture=platform.machine())
n = int(sys.argv[2])
reporter.queue_if_due(force=True)
c0, w0 = time.process_time(), time.perf_counter()
for _ in range(n):
    reporter.queue_if_due(force=True)
cpu, wall = (time.process_time() - c0) / n, (time.perf_counter() - w0) / n
body = reporter.queue.pending()[-1].body
c0 = time.process_time()
for _ in range(n):
    reporter.queue.key.sign(body)
sign = (time.process_time() - c0) / n
print(json.dumps({"cpu_ms_per_report": cpu * 1e3, "wall_ms_per_report": wall * 1e3,
                  "sign_ms": sign * 1e3, "import_rss_added_mb": after - before,
                  "rss_after_reports_mb": rss()}))
"""


def agent_cost(data: Path, n: int) -> dict[str, Any]:
    """Build + sign + queue one report, beside one Ed25519 signature (fresh process)."""
    copy = data.parent / (data.name + "-cost")
    shutil.copytree(data, copy)
    out = subprocess.run(
        [sys.executable, "-c", AGENT_COST, str(copy), str(n)],
        check=True,
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
    )
    got: dict[str, Any] = json.loads(out.stdout)
    got["ratio_to_sign"] = got["cpu_ms_per_report"] / got["sign_ms"]
    return {k: round(v, 3) for k, v in got.items()}


def rss_mb(pid: int) -> float:
    """The resident set of process ``pid`` in MiB (``VmRSS``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def daemon_rss(dirs: dict[str, Path], fleet_db: str, settle_s: float) -> dict[str, Any]:
    """Idle RSS of ``edgepack-agent run``: without fleet_url, with one (after its report
    was taken), and the agent of :data:`OLD_AGENT`, beside a bare interpreter."""
    started: dict[str, subprocess.Popen[bytes]] = {
        "bare_python": subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    }
    trees = {"no_fleet_url": ROOT, "fleet_url": ROOT, "old_agent": dirs["old-tree"]}
    data = {"no_fleet_url": dirs["plain"], "fleet_url": dirs["fleet"], "old_agent": dirs["old"]}
    marks = {name: (d / "status.json").stat().st_mtime for name, d in data.items()}
    try:
        for name, tree in trees.items():
            started[name] = subprocess.Popen(
                [sys.executable, "-m", "device_agent", "run", "--data-dir", str(data[name])],
                env=dict(os.environ, PYTHONPATH=str(tree)),
                cwd=tree,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 120
        store = open_store(fleet_db)
        try:
            record = json.loads((dirs["fleet"] / "keys" / "enrolment.json").read_text())

            def reported() -> bool:
                device = store.device(record["device_id"])
                return device is not None and device.last_counter > 0

            while not (
                all((data[n] / "status.json").stat().st_mtime > marks[n] for n in data)
                and reported()
            ):
                if time.monotonic() > deadline:
                    raise SystemExit("the daemons did not poll (and report) within 120 s")
                time.sleep(0.2)
        finally:
            store.close()
        time.sleep(settle_s)
        out = {name: round(rss_mb(p.pid), 1) for name, p in started.items()}
    finally:
        for p in started.values():
            p.terminate()
        for p in started.values():
            p.wait(30)
    return {f"{name}_rss_mb": v for name, v in out.items()}


def register_record(url: str, data: Path) -> None:
    """Register the device of ``data`` from its enrolment record, as an operator does."""
    record = fleetreport.parse_record((data / "keys" / "enrolment.json").read_bytes())
    store = open_store(url)
    try:
        store.register(ingest_mod.device_from_record(record, now=time.time()))
    finally:
        store.close()


# -- main --------------------------------------------------------------------------------


def main() -> int:
    """Run every measurement and print one JSON document."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=3000, help="reports per HTTP run")
    parser.add_argument("--clients", type=int, default=3, help="client processes")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--sizes", default="10000,100000", help="fleet sizes for status")
    parser.add_argument("--agent-reports", type=int, default=200, help="reports queued")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds idle before RSS")
    parser.add_argument("--skip-agent", action="store_true", help="no agent figures")
    parser.add_argument("--skip-http", action="store_true", help="no HTTP ingest runs")
    parser.add_argument(
        "--what-if", action="store_true", help="also PostgreSQL under uvicorn --workers 2"
    )
    parser.add_argument(
        "--what-if-fast",
        metavar="DIR",
        help="and with httptools + uvloop from DIR (pip install --target DIR httptools uvloop)",
    )
    args = parser.parse_args()
    out: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        scratch = Path(tmp)
        sqlite_url = f"sqlite:///{scratch / 'ingest.db'}"
        open_store(sqlite_url).close()
        port = free_port()
        with contextlib.ExitStack() as stack:
            dirs = stack.enter_context(devices_in_world(scratch, f"http://127.0.0.1:{port}"))
            body, signature = real_report(dirs["fleet"])
            out["report"] = {
                "body_bytes": len(body),
                "signature_header_bytes": len(fleetreport.SIGNATURE_HEADER) + 2 + len(signature),
                "body": json.loads(body),
            }
            if not args.skip_agent:
                out["agent"] = agent_cost(dirs["fleet"], args.agent_reports)
                register_record(sqlite_url, dirs["fleet"])
                with service(sqlite_url, scratch, port):
                    out["agent"].update(daemon_rss(dirs, sqlite_url, args.settle))
        pg = contextlib.ExitStack()
        with pg:
            pg_url = pg.enter_context(postgres_server())
            durable(pg_url)
            backends = {"sqlite": sqlite_url, "postgresql": create_database(pg_url, "ingest")}
            out["ingest"] = {}
            for name, url in backends.items():
                out["ingest"][name] = ingest_figures(url, scratch, Fleet(body, DEVICES), args)
                print(f"{name}: {out['ingest'][name]}", file=sys.stderr)
            if args.what_if and not args.skip_http:
                out["what_if_postgresql"] = what_if(
                    backends["postgresql"], scratch, Fleet(body, DEVICES), args
                )
            out["status"] = {}
            for n in (int(s) for s in args.sizes.split(",") if s):
                out["status"][str(n)] = {
                    "sqlite": status_figures(
                        f"sqlite:///{scratch / f'status-{n}.db'}", n, args.runs
                    ),
                    "postgresql": status_figures(
                        create_database(pg_url, f"status_{n}"), n, args.runs
                    ),
                }
                print(f"status {n}: {out['status'][str(n)]}", file=sys.stderr)
    out["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out, indent=2))
    return 0


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
