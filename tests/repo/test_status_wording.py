"""`edgepack repo status` in words a person reads: counts agree with their nouns, an
expired role says so instead of a negative (or negative-zero) number of days."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest

from edgepack import repo
from edgepack.cli import main
from edgepack.cli._repo import _days_left
from tests.repo.conftest import NOW, Producer, Repo, make_bundle


def test_one_release_and_expired_roles_read_as_words(
    digits_repo: Repo, producer: Producer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    digits_repo.publish(make_bundle(tmp_path / "b", producer, "digits", "1.0.0"))
    main(["repo", "status", str(digits_repo.workdir)])
    out = capsys.readouterr().out
    assert re.search(r"^  digits \(1 release\)$", out, re.MULTILINE), out
    assert "releases" not in out.split("models:")[1].split("channels:")[0]
    # The repository was signed at NOW (days ago): its timestamp has expired.
    timestamp = next(line for line in out.splitlines() if line.strip().startswith("timestamp"))
    assert re.search(r"\(expired [\d.]+ days? ago\)  <-- EXPIRED$", timestamp), timestamp
    assert "-" not in timestamp.split("(")[1].split(")")[0]


def test_a_role_expiring_this_very_moment_is_expired_not_minus_zero_days(
    digits_repo: Repo,
) -> None:
    store_now = NOW + timedelta(days=1, seconds=30)  # the timestamp's 1-day expiry, just past
    report = repo.open_status(digits_repo.workdir, now=store_now)
    timestamp = next(r for r in report["roles"] if r["role"] == "timestamp")
    assert timestamp["state"] == "expired"
    assert str(timestamp["days_left"]) == "0.0"  # not -0.0
    assert _days_left(timestamp["days_left"], timestamp["state"]) == "expired"
    assert "role timestamp has expired (" in " ".join(report["warnings"])
    assert "days left" not in " ".join(w for w in report["warnings"] if "timestamp" in w)
    assert _days_left(1.0, "ok") == "1 day"
    assert _days_left(12.5, "warning") == "12.5 days"
    assert _days_left(-3.0, "expired") == "expired 3 days ago"
