"""Crash safety: kill the agent (SIGKILL) at every state boundary and at random moments.

After every kill the invariants of DESIGN.md are checked: ``current`` names a
verified, healthy revision, the previous revision is intact, nothing outside
DATA was written; after a restart the update completes. State-boundary kills
use the real ``python -m device_agent run --once`` process; the 200 seeded
random kills fork the same code from a preloaded forkserver so each run costs
milliseconds of start-up instead of a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from device_agent import atrest, keyprotect, open_session
from device_agent.slots import Slots, remove_tree
from device_agent.state import Journal, State
from tests.agent import _crashchild
from tests.agent._support import MODEL, World, tree_digest
from tests.agent.conftest import poll

SEED = int(os.environ.get("EDGEPACK_CRASH_SEED", "20261128"))
RANDOM_RUNS = int(os.environ.get("EDGEPACK_CRASH_RUNS", "200"))


@dataclass
class Bench:
    """A served repository whose channel moved 1.0.0 -> 2.0.0, and a device still on 1.0.0."""

    world: World
    root: Path
    baseline: Path
    rev1: str
    rev2: str
    digests: dict[str, str]
    full_run_s: float

    def fresh_device(self, name: str, *, never_installed: bool = False) -> tuple[Path, Path]:
        """A copy of the baseline device (or of one that never installed anything)
        and empty watched folders (cwd, TMPDIR, HOME)."""
        data = self.root / name / "data"
        watch = self.root / name / "watch"
        if data.parent.exists():
            remove_tree(data.parent, inside=self.root)
        source = self.root / "fresh" if never_installed else self.baseline
        shutil.copytree(source, data, symlinks=True)
        for sub in ("cwd", "tmp", "home"):
            (watch / sub).mkdir(parents=True)
        return data, watch


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    root = tmp_path_factory.mktemp("crash")
    world = World.create(root / "world")
    world.publish("1.0.0", 2.0)
    baseline = root / "baseline"
    world.enroll(baseline)
    shutil.copytree(baseline, root / "fresh", symlinks=True)  # enrolled, never installed
    assert poll(baseline).action == "installed"
    rev1 = str(Slots(baseline, MODEL).current())
    world.publish("2.0.0", 3.0)
    ref = root / "reference"
    shutil.copytree(baseline, ref, symlinks=True)
    start = time.monotonic()
    assert poll(ref).action == "installed"
    full = time.monotonic() - start
    rev2 = str(Slots(ref, MODEL).current())
    digests = {
        rev1: revision_digest(baseline / "models" / MODEL / rev1),
        rev2: revision_digest(ref / "models" / MODEL / rev2),
    }
    yield Bench(world, root, baseline, rev1, rev2, digests, full)
    world.server.stop()


def revision_digest(path: Path) -> str:
    """What must not change in an installed revision: an encrypted one's bundle (its
    sealed key differs per device: a fresh nonce), a plain one's every file."""
    if atrest.is_encrypted(path):
        return hashlib.sha256((path / atrest.BUNDLE_FILE).read_bytes()).hexdigest()
    return tree_digest(path)


def decrypts_and_verifies(data: Path, revision: str) -> None:
    """An encrypted revision's key unseals and its payload decrypts and matches its digests."""
    path = Slots(data, MODEL).revision_dir(revision)
    if atrest.is_encrypted(path):
        atrest.open_revision(
            path,
            keyprotect.load_storage_key(data),
            name=MODEL,
            revision=revision,
            check_digests=True,
        ).wipe()


def check_invariants(bench: Bench, data: Path, watch: Path) -> str:
    """The invariants that must hold at every instant; returns the active revision.

    ``current`` resolves to a revision that decrypts, verifies and loads; the
    previous revision is intact."""
    slots = Slots(data, MODEL)
    active = slots.current()
    assert active in (bench.rev1, bench.rev2), f"current -> {active!r}"
    assert revision_digest(slots.revision_dir(active)) == bench.digests[active], (
        "active revision altered"
    )
    decrypts_and_verifies(data, active)
    session = open_session(MODEL, data_dir=data, monitor=False)
    assert session.get_inputs()[0].name == "X"
    rev1_dir = slots.revision_dir(bench.rev1)
    assert rev1_dir.is_dir() and revision_digest(rev1_dir) == bench.digests[bench.rev1], (
        "previous revision lost"
    )
    decrypts_and_verifies(data, bench.rev1)
    for sub in ("cwd", "tmp", "home"):
        assert list((watch / sub).iterdir()) == [], f"agent wrote outside DATA: {sub}"
    return active


def check_completed(bench: Bench, data: Path) -> None:
    slots = Slots(data, MODEL)
    assert slots.current() == bench.rev2
    assert sorted(slots.installed()) == sorted([bench.rev1, bench.rev2])
    assert Journal.load(data).model(MODEL).state in (State.COMMITTED, State.IDLE)
    assert not (data / "staging" / MODEL).exists() or not any((data / "staging" / MODEL).iterdir())
    assert list((data / "downloads").glob("*")) == []


def run_subprocess(data: Path, watch: Path, crash: str | None) -> int:
    env = dict(os.environ, TMPDIR=str(watch / "tmp"), HOME=str(watch / "home"))
    env.pop("EDGEPACK_AGENT_CRASH_AT", None)
    if crash:
        env["EDGEPACK_AGENT_CRASH_AT"] = crash
    repo_root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = str(repo_root)
    proc = subprocess.run(
        [sys.executable, "-m", "device_agent", "run", "--once", "--data-dir", str(data)],
        cwd=watch / "cwd",
        env=env,
        capture_output=True,
        timeout=120,
    )
    return proc.returncode


def forkserver() -> Any:
    """A forkserver context preloaded with everything an in-process poll imported.

    The bench fixture has run polls in this process, so ``sys.modules`` holds
    the agent's whole import graph; forked runs then start warm. The preload
    only takes effect before the server's first start, so every test uses this.
    """
    ctx = multiprocessing.get_context("forkserver")
    roots = (
        "device_agent",
        "edgepack",
        "onnxruntime",
        "numpy",
        "tuf",
        "securesystemslib",
        "cryptography",
        "model_signing",
        "sigstore",
        "in_toto_attestation",
        "google",
    )
    warm = sorted(m for m in sys.modules if m.split(".")[0] in roots and "test" not in m)
    ctx.set_forkserver_preload([*_crashchild.PRELOAD, *warm])
    return ctx


BOUNDARIES = [
    "checking:1",
    "downloading:1",
    "download-chunk:1",
    "stream-key:1",
    "stream-segment:1",
    "verifying:1",
    "staging:1",
    "staged-link:1",
    "decrypt-memory:1",
    "health-checking:1",
    "switching:1",
    "symlink-created:1",
    "committed:1",
    "write:3",
    "write:6",
]


@pytest.mark.slow
@pytest.mark.parametrize("crash", BOUNDARIES)
def test_kill_at_each_state_boundary_real_process(bench: Bench, crash: str) -> None:
    data, watch = bench.fresh_device("b-" + crash.replace(":", "-"))
    code = run_subprocess(data, watch, crash)
    assert code == -signal.SIGKILL, f"the crash point {crash} was never reached (exit {code})"
    check_invariants(bench, data, watch)
    assert run_subprocess(data, watch, None) == 0
    check_invariants(bench, data, watch)
    check_completed(bench, data)


@pytest.mark.slow
def test_kill_during_operator_rollback_switch(bench: Bench) -> None:
    data, watch = bench.fresh_device("rollback")
    assert run_subprocess(data, watch, None) == 0
    bench.world.repo.rollback()
    bench.world.server.requests.clear()
    try:
        for crash in ("switching:1", "symlink-created:1", "committed:1"):
            assert run_subprocess(data, watch, crash) == -signal.SIGKILL
            check_invariants(bench, data, watch)
        assert run_subprocess(data, watch, None) == 0
        assert Slots(data, MODEL).current() == bench.rev1
        assert bench.world.server.bundle_requests() == []  # the cached revision, no download
    finally:
        bench.world.repo.promote("2.0.0", bench.world.targets["2.0.0"])


@pytest.mark.slow
def test_random_kills_seeded(bench: Bench) -> None:
    """At least 200 SIGKILLs at seeded random crash points and random instants."""
    ctx = forkserver()
    # How long one forked, uninterrupted update takes: the range of the timed kills.
    data, watch = bench.fresh_device("calibrate")
    start = time.monotonic()
    proc = ctx.Process(target=_crashchild.run_once, args=(str(data), "", str(watch)))
    proc.start()
    proc.join(60)
    full_run_s = time.monotonic() - start
    assert proc.exitcode == 0
    check_completed(bench, data)
    rng = random.Random(SEED)
    kills = scenarios = 0
    seen_states: set[str] = set()
    while kills < RANDOM_RUNS:
        scenarios += 1
        data, watch = bench.fresh_device(f"r{scenarios % 4}")
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.6:
                spec, delay = f"any:{rng.randint(1, 20)}", None
            else:
                spec, delay = "", rng.uniform(0.0, full_run_s)
            proc = ctx.Process(target=_crashchild.run_once, args=(str(data), spec, str(watch)))
            proc.start()
            if delay is not None:
                proc.join(delay)
                if proc.is_alive():
                    # it may end by itself between the check and the kill
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid or 0, signal.SIGKILL)
            proc.join(60)
            assert proc.exitcode in (0, -signal.SIGKILL), (
                f"seed {SEED} run {kills}: {proc.exitcode}"
            )
            if proc.exitcode == -signal.SIGKILL:
                kills += 1
                seen_states.add(Journal.load(data).model(MODEL).state.value)
            check_invariants(bench, data, watch)
        proc = ctx.Process(target=_crashchild.run_once, args=(str(data), "", str(watch)))
        proc.start()
        proc.join(60)
        assert proc.exitcode == 0
        check_invariants(bench, data, watch)
        check_completed(bench, data)
    assert kills >= RANDOM_RUNS
    if RANDOM_RUNS >= 200:  # the kills landed in every state of the update
        # (checking is never written: it has no side effect to recover from)
        wanted = {s.value for s in State if s not in (State.IDLE, State.CHECKING)}
        assert seen_states >= wanted, seen_states


@pytest.mark.slow
def test_kills_on_a_device_that_never_had_a_model(bench: Bench) -> None:
    """On a fresh device `current` is absent or the verified new revision, never broken."""
    ctx = forkserver()
    for n in range(1, 16):
        data, watch = bench.fresh_device("fresh-run", never_installed=True)
        proc = ctx.Process(target=_crashchild.run_once, args=(str(data), f"any:{n}", str(watch)))
        proc.start()
        proc.join(60)
        assert proc.exitcode in (0, -signal.SIGKILL)
        active = Slots(data, MODEL).current()
        assert active in (None, bench.rev2), active
        if active is not None:
            assert revision_digest(Slots(data, MODEL).revision_dir(active)) == bench.digests[active]
            decrypts_and_verifies(data, active)
        for sub in ("cwd", "tmp", "home"):
            assert list((watch / sub).iterdir()) == []
        proc = ctx.Process(target=_crashchild.run_once, args=(str(data), "", str(watch)))
        proc.start()
        proc.join(60)
        assert proc.exitcode == 0 and Slots(data, MODEL).current() == bench.rev2
