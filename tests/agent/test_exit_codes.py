"""Every exit code docs/agent.md documents for ``run --once`` and ``check``, by real runs
of the ``edgepack-agent`` program against a repository served on loopback."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from pathlib import Path

from device_agent import config
from device_agent.outcome import Outcome, exit_code
from edgepack import keys
from tests.agent._support import MODEL, World, fast_limits, run_agent

ROOT = Path(__file__).resolve().parents[2]


def agent(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_agent(*args, "--data-dir", str(data))


def set_config(data: Path, **changes: object) -> None:
    """Edit DATA/config.toml the way an administrator would, through its own writer."""
    cfg = dataclasses.replace(config.load(data), **changes)  # type: ignore[arg-type]
    config.save(cfg)


def test_run_once_is_0_when_installed_or_up_to_date(world: World, data: Path) -> None:
    world.publish("1.0.0", 2.0)
    first = agent(data, "run", "--once")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(f"{MODEL}: installed 1.0.0-")
    again = agent(data, "run", "--once")
    assert again.returncode == 0 and "up-to-date" in again.stdout


def test_run_once_no_release_is_0(world: World, data: Path) -> None:
    out = agent(data, "run", "--once")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{MODEL}: no-release")


def test_run_once_unreachable_repository_is_7_with_the_reason_on_stderr(
    world: World, data: Path
) -> None:
    world.publish("1.0.0", 2.0)
    assert agent(data, "run", "--once").returncode == 0
    world.server.stop()
    out = agent(data, "run", "--once")
    assert out.returncode == 7, (out.stdout, out.stderr)
    assert out.stdout.startswith(f"{MODEL}: kept")  # the result line stays on stdout
    assert "Connection refused" in out.stderr and "warning:" in out.stderr
    assert "Traceback" not in out.stderr
    as_json = agent(data, "run", "--once", "--json")
    assert as_json.returncode == 7
    assert json.loads(as_json.stdout)[0]["exit_code"] == 7


def test_run_once_refused_release_is_4(world: World, data: Path) -> None:
    world.publish("1.0.0", 2.0)
    assert agent(data, "run", "--once").returncode == 0
    world.publish("1.1.0", 3.0, bad_golden=True)
    out = agent(data, "run", "--once")
    assert out.returncode == 4, (out.stdout, out.stderr)
    assert out.stdout.startswith(f"{MODEL}: failed 1.1.0 (health check")
    assert "error:" in out.stderr and "health check" in out.stderr
    # The refusal is remembered: the next poll keeps the running model and says 0.
    kept = agent(data, "run", "--once")
    assert kept.returncode == 0 and kept.stdout.startswith(f"{MODEL}: kept 1.1.0")


def test_run_once_not_encrypted_for_this_device_is_4(world: World, data: Path) -> None:
    world.publish("1.0.0", 2.0)
    other = keys.generate_recipient_key()
    keys.write_recipient_keypair(world.base / "other", other)
    set_config(data, recipient_key=str(world.base / "other.key"))
    out = agent(data, "run", "--once")
    assert out.returncode == 4, (out.stdout, out.stderr)
    assert out.stdout.startswith(f"{MODEL}: error ({MODEL} 1.0.0 is not encrypted for this")


def test_run_once_passphrase_locked_key_is_5(world: World, data: Path) -> None:
    world.publish("1.0.0", 2.0)
    keys.write_recipient_keypair(world.base / "locked", world.fleet_key, b"s3cret")
    set_config(data, recipient_key=str(world.base / "locked.key"))
    out = agent(data, "run", "--once")  # no terminal, no EDGEPACK_PASSPHRASE
    assert out.returncode == 5, (out.stdout, out.stderr)
    assert "passphrase" in out.stderr and "Traceback" not in out.stderr


def test_unknown_channel_in_config_is_3(world: World, data: Path) -> None:
    path = data / "config.toml"
    path.write_text(path.read_text().replace('channel = "stable"', 'channel = "prod"'))
    out = agent(data, "run", "--once")
    assert out.returncode == 3
    assert "unknown channel 'prod'" in out.stderr and out.stderr.count("\n") == 1


def test_the_most_severe_code_wins() -> None:
    def o(code: int) -> Outcome:
        return Outcome("m", "error", exit_code=code)

    assert exit_code([]) == 0
    assert exit_code([Outcome("m", "installed"), o(7)]) == 7
    assert exit_code([o(7), o(4)]) == 4
    assert exit_code([o(4), o(5), o(7)]) == 5
    assert exit_code([o(5), o(3)]) == 3
    assert exit_code([o(7), o(1)]) == 1 and exit_code([o(6), o(7)]) == 6


# -- edgepack-agent check ------------------------------------------------------------
def test_check_healthy_is_0(world: World, data: Path) -> None:
    world.publish("1.0.0", 2.0)
    assert agent(data, "run", "--once").returncode == 0
    out = agent(data, "check")
    assert out.returncode == 0, out.stdout
    assert out.stdout.startswith(f"ok: {MODEL} runs 1.0.0-")
    report = json.loads(agent(data, "check", "--json").stdout)
    assert report["healthy"] is True and report["exit_code"] == 0


def test_check_nothing_running_is_3(world: World, data: Path) -> None:
    assert agent(data, "run", "--once").returncode == 0  # no release yet
    out = agent(data, "check")
    assert out.returncode == 3
    assert out.stdout.startswith(f"{MODEL}: no model running")


def test_check_failed_install_is_4(world: World, data: Path) -> None:
    world.publish("1.0.0", 2.0)
    assert agent(data, "run", "--once").returncode == 0
    world.publish("1.1.0", 3.0, bad_golden=True)
    assert agent(data, "run", "--once").returncode == 4
    out = agent(data, "check", "--json")
    assert out.returncode == 4
    report = json.loads(out.stdout)
    assert [p["code"] for p in report["problems"]] == [4]
    assert "health check" in report["problems"][0]["problem"]


def test_check_stale_is_7(world: World, data: Path) -> None:
    world.publish("1.0.0", 2.0)
    assert agent(data, "run", "--once").returncode == 0
    world.server.stop()
    assert agent(data, "run", "--once").returncode == 7
    # One failed poll within the bound is not a problem: the loop retries.
    assert agent(data, "check", "--max-stale", "600").returncode == 0
    time.sleep(1.1)
    out = agent(data, "check", "--max-stale", "1")
    assert out.returncode == 7, out.stdout
    assert "last checked" in out.stdout and "Connection refused" in out.stdout


def test_check_never_polled_is_7_when_something_runs_else_3(world: World, data: Path) -> None:
    out = agent(data, "check", "--json")
    assert out.returncode == 3  # nothing runs, never checked: the worse is said first
    codes = [p["code"] for p in json.loads(out.stdout)["problems"]]
    assert codes == [3, 7]


def test_check_overdue_confirmation_is_6(world: World, tmp_path: Path) -> None:
    data = tmp_path / "dev"
    world.enroll(data, limits=fast_limits(confirm_window_s=1.0))
    world.publish("1.0.0", 2.0)
    assert agent(data, "run", "--once").returncode == 0
    world.publish("1.1.0", 3.0)
    assert agent(data, "run", "--once").returncode == 0
    assert agent(data, "check").returncode == 0  # awaiting, inside its window
    time.sleep(1.2)
    out = agent(data, "check")
    assert out.returncode == 6, out.stdout
    assert "awaits confirmation" in out.stdout
    # The next poll rolls back; then the failed release is what check reports.
    assert agent(data, "run", "--once").returncode == 0
    assert agent(data, "check").returncode == 0


def test_check_refuses_a_negative_bound(world: World, data: Path) -> None:
    out = agent(data, "check", "--max-stale", "-5")
    assert out.returncode == 3 and "negative" in out.stderr


# -- status.json after the local verdicts ----------------------------------------------
def test_status_json_follows_report_bad_revert_and_confirm(world: World, tmp_path: Path) -> None:
    data = tmp_path / "dev"
    world.enroll(data, limits=fast_limits(confirm_window_s=3600.0))
    world.publish("1.0.0", 2.0)
    assert agent(data, "run", "--once").returncode == 0
    world.publish("1.1.0", 3.0)
    assert agent(data, "run", "--once").returncode == 0
    before = json.loads(agent(data, "status", "--json").stdout)["models"][MODEL]
    assert before["version"] == "1.1.0" and before["awaiting_confirmation"] is True
    said = agent(data, "report-bad", MODEL)
    assert said.returncode == 0 and said.stdout.startswith(f"{MODEL}: reported bad; running 1.0.0-")
    assert (
        "rolled back to 1.0.0-" in said.stderr and "reported bad by the application" in said.stderr
    )
    listed = agent(data, "list").stdout
    assert "known_good" not in listed and "active, known-good" in listed
    assert "failed here: reported bad by the application" in listed
    after = json.loads((data / "status.json").read_text())["models"][MODEL]
    assert after["version"] == "1.0.0" and after["awaiting_confirmation"] is False
    assert after["failed_releases"]["1.1.0"] == "reported bad by the application"
    assert after["last_check"] == before["last_check"]  # no poll happened
    world.publish("1.2.0", 4.0)
    assert agent(data, "run", "--once").returncode == 0
    assert agent(data, "confirm", MODEL).returncode == 0
    confirmed = json.loads(agent(data, "status", "--json").stdout)["models"][MODEL]
    assert confirmed["version"] == "1.2.0" and confirmed["awaiting_confirmation"] is False
    assert agent(data, "revert", MODEL).returncode == 0
    reverted = json.loads(agent(data, "status", "--json").stdout)["models"][MODEL]
    assert reverted["version"] == "1.0.0" and "1.2.0" in reverted["failed_releases"]


def test_status_human_output_says_fresh_or_stale(world: World, data: Path) -> None:
    world.publish("1.0.0", 2.0)
    assert agent(data, "run", "--once").returncode == 0
    out = agent(data, "status").stdout
    assert "fresh" in out and "False" not in out and "True" not in out
    assert f"{MODEL}: 1.0.0-" in out
    world.server.stop()
    agent(data, "run", "--once")
    out = agent(data, "status").stdout
    assert "stale (the repository could not be refreshed)" in out and "True" not in out
