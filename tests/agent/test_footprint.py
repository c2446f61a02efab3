"""The device's footprint: no builder packages, nothing of the operator CLI or the
repository, and no model runtime in the daemon (onnxruntime and numpy load only in the
health check's child process)."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import device_agent
from device_agent import status
from device_agent.state import Journal
from tests.agent._support import MODEL, World, fast_limits
from tests.agent.conftest import poll

ROOT = Path(__file__).resolve().parents[2]
BUILDER_ONLY = ["torch", "onnx", "skl2onnx", "sklearn", "onnxscript", "joblib"]


def test_agent_modules_import_no_builder_package() -> None:
    names = sorted(m.name for m in pkgutil.iter_modules(device_agent.__path__, "device_agent."))
    assert "device_agent.agent" in names and "device_agent.safeload" in names
    names = [n for n in names if n != "device_agent.__main__"]
    code = (
        "import importlib, sys\n"
        f"for n in {names!r}: importlib.import_module(n)\n"
        "import device_agent.cli\n"
        f"bad = [m for m in {BUILDER_ONLY!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert out.stdout.strip() == "", f"builder-only packages imported: {out.stdout.strip()}"


# -- the device side imports nothing of the operator side, and no model runtime -------------
# edgepack.bundle, edgepack.keys, edgepack.signing, edgepack.channel and edgepack.hw are the
# device's too (it reads, verifies and decrypts bundles); the operator CLI, the repository and
# the builder are not. onnxruntime and numpy load only in the health check's child process,
# the producer-signature verifier (model-signing, sigstore) only in device_agent.sigcheck's.
OPERATOR_SIDE = ("edgepack.cli", "edgepack.repo", "edgepack.build")
# pydantic: typer 0.29 imported it to parse every option (10 MB); typer is pinned below it.
RUNTIME = ("onnxruntime", "numpy", "model_signing", "sigstore", "sigstore_models", "pydantic")


def _imported(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; the forbidden modules it left in sys.modules."""
    prefixes = (*OPERATOR_SIDE, *RUNTIME, *BUILDER_ONLY)
    probe = (
        f"{code}\nimport sys\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {list(RUNTIME + tuple(BUILDER_ONLY))!r}"
        f" or m.startswith({prefixes!r}))\n"
        "print('IMPORTED ' + ','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    line = [x for x in out.stdout.splitlines() if x.startswith("IMPORTED ")][-1]
    return [m for m in line[len("IMPORTED ") :].split(",") if m]


def test_agent_cli_imports_no_operator_cli_repository_builder_or_runtime() -> None:
    assert _imported("import device_agent.cli") == []
    assert _imported("import device_agent.agent, device_agent.loop, device_agent.api") == []


def test_operator_cli_still_imports_its_helpers() -> None:
    """The control for the test above: the probe does see the operator side."""
    assert "edgepack.cli" in _imported("import edgepack.cli")


def test_run_once_with_nothing_new_imports_no_runtime(world: World, data: Path) -> None:
    world.publish("1.0.0", 2.0)
    assert poll(data).action == "installed"
    imported = _imported(
        "from device_agent.cli import main\n"
        f"assert main(['run', '--once', '--data-dir', {str(data)!r}]) == 0\n"
        "import json, pathlib\n"
        f"status = json.loads(pathlib.Path({str(data / 'status.json')!r}).read_text())\n"
        "assert status['models']['digits']['revision'].startswith('1.0.0'), status\n"
    )
    assert imported == []


def test_run_once_that_installs_leaves_no_runtime_or_verifier(world: World, data: Path) -> None:
    """The install verifies the signature and runs the health check, both in children."""
    world.publish("1.0.0", 2.0)
    imported = _imported(
        "from device_agent.cli import main\n"
        f"assert main(['run', '--once', '--data-dir', {str(data)!r}]) == 0\n"
        "from device_agent.state import Journal\n"
        "import pathlib\n"
        f"record = Journal.load(pathlib.Path({str(data)!r})).model('digits')\n"
        "assert [r.healthy for r in record.revisions.values()] == [True], record\n"
    )
    assert imported == []


def _mapped(pid: int, names: tuple[str, ...]) -> list[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return [n for n in names if n in maps]


def test_daemon_holds_no_onnxruntime_after_an_install(world: World, tmp_path: Path) -> None:
    """`edgepack-agent run` installs a model (its health check runs onnxruntime) and
    afterwards has neither onnxruntime's nor numpy's shared library mapped."""
    data = tmp_path / "daemon-data"
    world.enroll(data, fast_limits(poll_interval_s=0.5, poll_jitter=0.0))
    daemon = subprocess.Popen(
        [sys.executable, "-m", "device_agent", "run", "--data-dir", str(data)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait(lambda: (data / "status.json").exists(), daemon)
        assert _mapped(daemon.pid, ("onnxruntime", "_multiarray_umath")) == []
        world.publish("1.0.0", 2.0)
        _wait(lambda: status.load(data).get("models", {}).get(MODEL, {}).get("revision"), daemon)
        record = Journal.load(data).model(MODEL)
        assert any(r.healthy for r in record.revisions.values())  # the health check ran
        assert _mapped(daemon.pid, ("onnxruntime", "_multiarray_umath")) == []
        assert daemon.poll() is None
    finally:
        daemon.terminate()
        daemon.wait(10)


def _wait(done: Callable[[], object], proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert proc.poll() is None, f"the daemon exited {proc.returncode}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
