"""The systemd unit and the snap install, verify and describe the agent as documented.

The unit is checked by systemd's own tools (``systemd-analyze verify`` and ``security``,
``systemd-sysusers``, ``systemd-tmpfiles``) in a scratch root that holds the real console
script where the documented installs put it; the snap's YAML is validated against the
constraints of snapcraft's core24 schema and its configure hook enrols a real device.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.agent._support import MODEL, World

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "packaging" / "edgepack-agent.service"
SNAPCRAFT = ROOT / "snap" / "snapcraft.yaml"
HOOK = ROOT / "snap" / "hooks" / "configure"
SCHEMA = Path(__file__).resolve().parent / "data" / "snapcraft-core24.schema.json"
HOST_UNITS = Path("/usr/lib/systemd/system")  # sysinit.target and the rest verify needs


def _systemd_tool(name: str) -> str:
    """The path of a systemd tool; tests/setup/install-services.sh installs them."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is missing: run tests/setup/install-services.sh (Debian's systemd)")
    return path


def _console_script() -> Path:
    """The installed ``edgepack-agent`` console script of the environment running the tests."""
    script = Path(sys.executable).parent / "edgepack-agent"
    assert script.is_file(), f"{script} is missing: install the package (pip install -e .)"
    return script


def _scratch_root(base: Path) -> Path:
    """A root with the host's unit files and the shipped unit in /etc/systemd/system."""
    root = base / "root"
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    shutil.copytree(HOST_UNITS, root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    shutil.copyfile(UNIT, root / "etc" / "systemd" / "system" / UNIT.name)
    return root


def _install_script(root: Path, folder: str) -> None:
    """Copy the real console script into ``root/folder`` (a copy: links would leave the root)."""
    dest = root / folder.lstrip("/") / "edgepack-agent"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(_console_script(), dest)


def _verify(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_systemd_tool("systemd-analyze"), "verify", f"--root={root}", UNIT.name],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_systemd_unit_runs_the_loop_confined_to_its_data_dir() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(UNIT)
    service = unit["Service"]
    assert service["ExecStart"].split() == [
        "edgepack-agent",
        "run",
        "--data-dir",
        "/var/lib/edgepack",
    ]
    assert service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] == "/var/lib/edgepack"
    assert service["StateDirectoryMode"] == "0750"  # docs/agent.md: DATA 0750
    assert service["UMask"] == "0027"  # models group-readable, never world-readable
    assert service["RestartPreventExitStatus"] == "3 5"  # not enrolled, key locked: no loop
    assert unit["Unit"]["ConditionPathExists"] == "/var/lib/edgepack/config.toml"
    text = UNIT.read_text()
    for env in ("TMPDIR=/var/lib/edgepack/tmp", "XDG_CACHE_HOME=/var/lib/edgepack/cache"):
        assert f"Environment={env}" in text
    assert "LoadCredential=edgepack-passphrase:/etc/edgepack/passphrase" in text
    assert unit["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.parametrize("folder", ["/usr/local/bin", "/usr/bin"])
def test_unit_verifies_with_the_script_on_systemds_search_path(tmp_path: Path, folder: str) -> None:
    """As shipped, the unit finds the console script where pip (as root) or a distro put it."""
    root = _scratch_root(tmp_path)
    missing = _verify(root)
    assert missing.returncode != 0
    assert "edgepack-agent is not executable" in missing.stderr
    _install_script(root, folder)
    out = _verify(root)
    assert out.returncode == 0, out.stderr
    assert out.stderr == "" and out.stdout == ""


def test_unit_verifies_with_the_documented_venv_drop_in(tmp_path: Path) -> None:
    """An agent in a virtual environment gets the drop-in the unit's header documents."""
    root = _scratch_root(tmp_path)
    _install_script(root, "/opt/edgepack/bin")
    header = [line.removeprefix("#   ") for line in UNIT.read_text().splitlines()]
    start = header.index("[Service]")
    drop_in = "\n".join(header[start : start + 3]) + "\n"
    assert "ExecStart=/opt/edgepack/bin/edgepack-agent run" in drop_in
    folder = root / "etc" / "systemd" / "system" / f"{UNIT.name}.d"
    folder.mkdir()
    (folder / "venv.conf").write_text(drop_in)
    out = _verify(root)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""


def test_unit_security_exposure_is_at_most_2() -> None:
    out = subprocess.run(
        [
            _systemd_tool("systemd-analyze"),
            "security",
            "--offline=true",
            "--threshold=20",  # exposure x 10: fails the command above 2.0
            "--no-pager",
            str(UNIT),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    text = out.stdout + out.stderr
    found = re.search(r"Overall exposure level for edgepack-agent\.service: (\d+\.\d)", text)
    assert found, text
    assert float(found.group(1)) <= 2.0, text
    assert out.returncode == 0, text


def test_sysusers_and_tmpfiles_make_the_user_and_the_data_dir(tmp_path: Path) -> None:
    """What the package's install step runs: the user and its group, DATA 0750 for them."""
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles needs root to give /var/lib/edgepack to the edgepack user")
    root = tmp_path / "root"
    for kind in ("sysusers.d", "tmpfiles.d"):
        (root / "usr" / "lib" / kind).mkdir(parents=True)
        shutil.copyfile(
            ROOT / "packaging" / kind / "edgepack.conf",
            root / "usr" / "lib" / kind / "edgepack.conf",
        )
    (root / "etc").mkdir()
    subprocess.run(
        [_systemd_tool("systemd-sysusers"), f"--root={root}", "edgepack.conf"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    passwd = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/passwd").read_text().splitlines()
    }
    groups = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/group").read_text().splitlines()
    }
    user = passwd["edgepack"]
    assert user[5] == "/var/lib/edgepack" and user[6] == "/usr/sbin/nologin"
    assert int(user[2]) < 1000  # a system user
    assert user[3] == groups["edgepack"][2]
    subprocess.run(
        [_systemd_tool("systemd-tmpfiles"), "--create", f"--root={root}", "edgepack.conf"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    data = (root / "var/lib/edgepack").stat()
    assert data.st_mode & 0o7777 == 0o750
    assert (data.st_uid, data.st_gid) == (int(user[2]), int(user[3]))


def test_enrolling_where_the_data_dir_cannot_be_made_is_one_line(
    world: World, tmp_path: Path
) -> None:
    """`sudo -u edgepack edgepack-agent enroll` before the data dir exists: a clear refusal."""
    parent = tmp_path / "var-lib"
    parent.mkdir()
    parent.chmod(0o555)
    # root writes anywhere: run it as root without capabilities, as an ordinary user is
    drop = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"] if os.geteuid() == 0 else []
    data = parent / "edgepack"
    out = subprocess.run(
        [
            *drop,
            *(sys.executable, "-m", "device_agent", "enroll", "--data-dir", str(data)),
            *("--repo-url", world.server.url, "--root", str(world.root_json), "--model", MODEL),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    assert out.returncode == 3, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert f"cannot prepare the data directory {data}" in lines[0]
    assert "internal error" not in lines[0] and "Traceback" not in out.stderr
    assert not data.exists()


def _snap_project() -> dict[str, Any]:
    project = yaml.safe_load(SNAPCRAFT.read_text())
    assert isinstance(project, dict)
    return project


def _schema_errors(project: dict[str, Any]) -> list[str]:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(project)]


def test_snap_yaml_meets_snapcraft_core24_schema() -> None:
    project = _snap_project()
    assert _schema_errors(project) == []
    # the schema is not a formality: the summary this file once had is refused
    long = dict(
        project,
        summary="Installs, health-checks and rolls back signed, "
        "encrypted ML models on edge devices",
    )
    assert len(long["summary"]) == 82
    assert any("summary" in error for error in _schema_errors(long))
    typo = json.loads(json.dumps(project))
    typo["apps"]["daemon"]["install_mode"] = "disable"
    assert any("install_mode" in error for error in _schema_errors(typo))


def test_snap_is_a_strict_daemon_started_only_after_enrolment() -> None:
    project = _snap_project()
    assert project["confinement"] == "strict" and project["base"] == "core24"
    assert set(project["platforms"]) == {"amd64", "arm64"}
    apps = project["apps"]
    daemon = apps["daemon"]
    assert daemon["command"] == "bin/edgepack-agent run --data-dir $SNAP_COMMON"
    assert daemon["daemon"] == "simple"
    assert daemon["install-mode"] == "disable"
    assert daemon["environment"]["XDG_CACHE_HOME"] == "$SNAP_COMMON/cache"
    assert "hardware-observe" in daemon["plugs"]
    for verdict in ("confirm", "report-bad", "status"):
        assert apps[verdict]["command"] == f"bin/edgepack-agent {verdict} --data-dir $SNAP_COMMON"
    assert "configure" in project["hooks"]
    assert HOOK.stat().st_mode & 0o111, "snapd runs only an executable hook"


def _run_hook(snap: Path, settings: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The configure hook as snapd runs it, with a stand-in ``snapctl`` (snapd is not here)."""
    state = snap / "snapctl"
    state.mkdir(exist_ok=True)
    for old in state.glob("get-*"):
        old.unlink()
    for key, value in settings.items():
        (state / f"get-{key}").write_text(value)
    fake = snap / "fakebin" / "snapctl"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(
        "#!/bin/sh\n"
        'state="$(dirname "$0")/../snapctl"\n'
        'if [ "$1" = get ]; then cat "$state/get-$2" 2>/dev/null; exit 0; fi\n'
        'echo "$*" >>"$state/calls"\n'
    )
    fake.chmod(0o755)
    env = {
        "PATH": f"{fake.parent}:{os.environ['PATH']}",
        "SNAP": str(snap / "snap"),
        "SNAP_COMMON": str(snap / "common"),
        "SNAP_DATA": str(snap / "data"),
        "SNAP_INSTANCE_NAME": "edgepack-agent",
    }
    return subprocess.run(
        ["/bin/sh", str(HOOK)], capture_output=True, text=True, env=env, timeout=120
    )


def test_configure_hook_enrols_then_starts_the_daemon(world: World, tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    (snap / "snap" / "bin").mkdir(parents=True)
    (snap / "snap" / "bin" / "edgepack-agent").symlink_to(_console_script())
    (snap / "common").mkdir()
    (snap / "data").mkdir()
    calls = snap / "snapctl" / "calls"
    # installed, nothing set yet: nothing happens
    out = _run_hook(snap, {})
    assert out.returncode == 0, out.stderr
    assert not calls.exists() and not (snap / "common" / "config.toml").exists()
    # half the settings: one line, exit 3, the daemon stays off
    out = _run_hook(snap, {"repo-url": world.server.url})
    assert out.returncode == 3
    assert out.stderr.strip().splitlines() == [
        "edgepack-agent: set root=FILE and model=NAME[,NAME...] together with repo-url"
    ]
    # a root that is not TUF metadata: the agent's own one-line refusal
    settings = {
        "repo-url": world.server.url,
        "root": str(world.producer_pub),
        "model": MODEL,
        "trust": str(world.producer_pub),
    }
    out = _run_hook(snap, settings)
    assert out.returncode == 3
    assert len(out.stderr.strip().splitlines()) == 1 and "not TUF root metadata" in out.stderr
    assert not calls.exists()
    # the full settings enrol, then enable and start the daemon
    settings["root"] = str(world.root_json)
    out = _run_hook(snap, settings)
    assert out.returncode == 0, out.stderr
    config = (snap / "common" / "config.toml").read_text()
    assert world.server.url in config and MODEL in config
    assert calls.read_text().splitlines() == ["start --enable edgepack-agent.daemon"]
    # snapd runs the hook again on every `snap set` and refresh: same settings, no re-enrolment
    before = (snap / "common" / "config.toml").stat().st_mtime_ns
    out = _run_hook(snap, settings)
    assert out.returncode == 0, out.stderr
    assert (snap / "common" / "config.toml").stat().st_mtime_ns == before
    assert calls.read_text().splitlines() == ["start --enable edgepack-agent.daemon"]


def test_test_setup_installs_the_systemd_tools() -> None:
    """A fresh machine gets systemd-analyze & co. from `make test`'s services step."""
    out = subprocess.run(
        [str(ROOT / "tests" / "setup" / "install-services.sh"), "--packages"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert "systemd" in out.stdout.split()


# prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN): the kernel's own form of the unit's
# MemoryDenyWriteExecute=yes (no mapping both writable and executable, no mapping made
# executable later); kept across fork and exec, so the health-check child has it too.
_UNDER_MDWE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:
    sys.exit(99)
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def _under_mdwe(*args: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [sys.executable, "-c", _UNDER_MDWE, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    if out.returncode == 99:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    return out


def test_install_and_health_check_run_under_memory_deny_write_execute(
    world: World, tmp_path: Path
) -> None:
    """MemoryDenyWriteExecute=yes leaves the agent and onnxruntime's health check working."""
    probe = _under_mdwe(
        "-c",
        "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)",
    )
    assert probe.returncode != 0 and "PermissionError" in probe.stderr  # the rule is in force
    data = tmp_path / "data"
    world.enroll(data)
    world.publish("1.0.0", 2.0)
    out = _under_mdwe("-m", "device_agent", "run", "--once", "--json", "--data-dir", str(data))
    assert out.returncode == 0, out.stderr
    outcome = json.loads(out.stdout)[0]
    assert outcome["action"] == "installed", outcome
    assert (data / "models" / MODEL / "current").resolve().name.startswith("1.0.0-")
