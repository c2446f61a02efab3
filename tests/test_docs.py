"""The docs stay true: every test the threat model cites exists, every file it names is there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _test_names() -> set[str]:
    """Every test function and every test module stem under tests/."""
    names: set[str] = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        names.add(path.stem)
        names.update(re.findall(r"^def (test_\w+)", path.read_text(), flags=re.MULTILINE))
    return names


def test_threat_model_cites_only_tests_that_exist() -> None:
    cited = set(re.findall(r"\b(test_\w+)", (ROOT / "docs" / "threat-model.md").read_text()))
    missing = sorted(cited - _test_names())
    assert not missing, f"docs/threat-model.md cites tests that do not exist: {missing}"
    assert len(cited) > 30


def test_docs_name_files_that_exist() -> None:
    for doc in ("threat-model.md", "operations.md", "bundle-format.md", "architecture.md"):
        text = (ROOT / "docs" / doc).read_text()
        for path in re.findall(
            r"`((?:tests|edgepack|device_agent|hw|benchmarks|snap|packaging)/[\w./-]+)`", text
        ):
            clean = path.split("::")[0].rstrip("/")
            if re.search(r"[A-Z]{3,}", clean):  # a placeholder such as NAME
                continue
            assert (ROOT / clean).exists(), f"docs/{doc} names {path}, which does not exist"


def test_readme_links_point_at_docs_that_exist() -> None:
    text = (ROOT / "README.md").read_text()
    for link in re.findall(r"\]\((docs/[\w.-]+)\)", text):
        assert (ROOT / link).is_file(), f"README links {link}, which does not exist"
    assert "make demo" in text and "make test" in text


def test_cli_reference_is_generated_from_the_commands() -> None:
    from edgepack.cli._docs import render

    committed = (ROOT / "docs" / "cli.md").read_text()
    assert committed == render(), (
        "docs/cli.md is stale: run .venv/bin/python -m edgepack.cli._docs > docs/cli.md"
    )
