"""The set-up scripts name every package they need and skip in one line where they cannot run.

A fresh machine has none of the emulation's or the services' packages; each
script must install them all by itself (``tests/setup/fresh-check.sh --purge``
proves it end to end), and a machine that cannot have them (no root) gets one
clear line and the status the tests turn into a skip, never an error.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMULATION = ROOT / "hw" / "emulation" / "aarch64.sh"
RUN_GUEST = ROOT / "hw" / "emulation" / "run-aarch64.sh"
SERVICES = ROOT / "tests" / "setup" / "install-services.sh"
CANNOT_RUN = 3


def _packages(script: Path) -> set[str]:
    out = subprocess.run(
        [str(script), "--packages"], capture_output=True, text=True, check=True, timeout=30
    )
    return set(out.stdout.split())


def test_emulation_names_every_package_mmdebstrap_needs_for_a_foreign_architecture() -> None:
    packages = _packages(EMULATION)
    # arch-test is only a Recommends of mmdebstrap: without it a foreign root fails (exit 25).
    assert {"qemu-user-static", "mmdebstrap", "arch-test", "debian-archive-keyring"} <= packages
    assert {"util-linux", "mount"} <= packages  # flock, unshare, mount


def test_services_name_nginx() -> None:
    assert "nginx" in _packages(SERVICES)


def test_services_name_postgresql_for_the_fleet_store_tests() -> None:
    assert "postgresql" in _packages(SERVICES)  # tests/pg.py runs initdb and pg_ctl from it


def test_unknown_option_is_a_usage_error() -> None:
    out = subprocess.run(
        [str(EMULATION), "--bogus"], capture_output=True, text=True, check=False, timeout=30
    )
    assert out.returncode == 2
    assert "usage:" in out.stderr


def _readable_copy(script: Path) -> Path:
    """A copy of ``script`` and its siblings where an unprivileged user may run it (the
    checkout may lie under a folder only root can enter, e.g. a 0700 temporary one)."""
    home = Path(tempfile.mkdtemp(prefix="edgepack-setup-"))
    home.chmod(0o755)
    copy = home / script.parent.name
    shutil.copytree(script.parent, copy, ignore=shutil.ignore_patterns("cache"))
    for path in (copy, *copy.rglob("*")):
        path.chmod(0o755)
    return copy / script.name


def _as_nobody(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to run a script as an unprivileged user")
    script = _readable_copy(Path(argv[0]))
    try:
        return _run_as_nobody([str(script), *argv[1:]], env)
    finally:
        shutil.rmtree(script.parent.parent)


def _run_as_nobody(argv: list[str], env: dict[str, str] | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=env,
        cwd="/",
    )


@pytest.mark.parametrize(
    "argv", [[EMULATION], [RUN_GUEST, "true"]], ids=["aarch64.sh", "run-aarch64.sh"]
)
def test_emulation_without_root_says_why_in_one_line_and_exits_cannot(argv: list[Path]) -> None:
    out = _as_nobody(*map(str, argv))
    assert out.returncode == CANNOT_RUN, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "needs root" in lines[0]


def test_services_without_root_say_why_in_one_line_and_do_not_fail() -> None:
    # A service that is not installed, a user who cannot install it: skip, not fail.
    env = {**os.environ, "EDGEPACK_SERVICES": "edgepack-no-such-server:edgepack-no-such-package"}
    out = _as_nobody(str(SERVICES), env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "skipped" in lines[0] and "edgepack-no-such-package" in lines[0]
