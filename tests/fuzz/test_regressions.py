"""Every crash reproducer the fuzzers found, fed through its harness's entry point.

``tests/fuzz/crashes/TARGET/`` holds the (minimised) inputs; each must now end
in success or one of the project's own errors (the harness's ``EXPECTED``).
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path

import pytest

from tests.fuzz.run import TARGETS

CRASHES = Path(__file__).resolve().parent / "crashes"
CASES = sorted(
    (target, path)
    for target in TARGETS
    if (CRASHES / target).is_dir()
    for path in (CRASHES / target).iterdir()
    if path.is_file()
)


def test_reproducers_exist() -> None:
    assert CASES, "no crash reproducers under tests/fuzz/crashes"


@pytest.mark.parametrize(("target", "path"), CASES, ids=[f"{t}/{p.name}" for t, p in CASES])
def test_reproducer_gives_a_project_error(target: str, path: Path) -> None:
    harness = importlib.import_module(f"tests.fuzz.fuzz_{target}")
    # Any other exception, or a broken invariant (AssertionError), fails the test.
    with contextlib.suppress(*harness.EXPECTED):
        harness.one_input(path.read_bytes())
