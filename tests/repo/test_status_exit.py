"""``edgepack repo status`` as a monitoring timer runs it: exit 0 while every role is
valid, exit 4 (with the report still printed) once a role has expired."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from edgepack import repo
from edgepack.cli import main


def test_status_exits_0_while_valid_and_4_once_a_role_expired(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    now = datetime.now(timezone.utc)
    fresh = tmp_path / "fresh"
    repo.init(fresh, passphrase=None, now=now)
    assert main(["repo", "status", str(fresh)]) == 0
    out, err = capsys.readouterr()
    assert "EXPIRED" not in out and "error" not in err

    old = tmp_path / "old"
    repo.init(old, passphrase=None, now=now - timedelta(days=30))  # timestamp lasts a day
    assert main(["repo", "status", str(old)]) == 4
    out, err = capsys.readouterr()
    assert "timestamp" in out and "<-- EXPIRED" in out  # the report is still printed
    errors = [line for line in err.splitlines() if line.startswith("edgepack: error:")]
    assert len(errors) == 1 and "expired: timestamp" in errors[0], err
    assert "repo refresh" in errors[0]
    assert "root" not in errors[0].split(";")[0]  # root (a year) is still valid

    assert main(["repo", "status", str(old), "--json"]) == 4
    out, _ = capsys.readouterr()
    states = {r["role"]: r["state"] for r in json.loads(out)["roles"]}
    assert states["timestamp"] == "expired" and states["root"] == "ok"
