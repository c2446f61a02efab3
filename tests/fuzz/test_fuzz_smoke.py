"""Each fuzz harness still runs: a few seconds of fuzzing over its seeds, no crash.

Keeps the harnesses alive under ``make test``; the long runs are ``make fuzz``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.fuzz import run

SECONDS = 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("target", run.TARGETS)
def test_harness_fuzzes_its_seeds_without_a_crash(target: str, tmp_path: Path) -> None:
    corpus = run.prepare(target, tmp_path)
    assert any(corpus.iterdir()), f"{target} has no seeds"
    result = subprocess.run(
        run.command(target, tmp_path, f"-max_total_time={SECONDS}"),
        cwd=run.ROOT,
        env=run.environment(target, tmp_path),
        capture_output=True,
        text=True,
        check=False,
    )
    artifacts = list((tmp_path / target / "artifacts").iterdir())
    assert result.returncode == 0 and not artifacts, result.stdout[-4000:] + result.stderr[-4000:]
    assert "stat::number_of_executed_units" in result.stderr
