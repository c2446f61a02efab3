"""The docs stay true: every test the threat model cites exists, every file the docs name or
link is in the repository."""

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


DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
# Paths the docs name that are made, not committed: the wheel's copy of
# hw/profiles (pyproject's force-include) and what hw/emulation/aarch64.sh caches.
MADE_NOT_COMMITTED = ("edgepack/hw_profiles", "hw/emulation/cache")


def test_docs_name_files_that_exist() -> None:
    for doc in DOCS:
        text = doc.read_text()
        for path in re.findall(
            r"`((?:tests|edgepack|device_agent|hw|benchmarks|snap|packaging|docs)/[\w./-]+)`",
            text,
        ):
            clean = path.split("::")[0].rstrip("/")
            if re.search(r"[A-Z]{3,}", clean):  # a placeholder such as NAME
                continue
            if clean.startswith(MADE_NOT_COMMITTED):
                continue
            assert (ROOT / clean).exists(), f"{doc.name} names {path}, which does not exist"


def missing_references(doc: Path, text: str) -> list[str]:
    """Files ``text`` (the content of ``doc``) links or cites that the repository lacks.

    Relative Markdown links must resolve from the doc's folder; a bare file name
    such as ``DESIGN.md`` or ``docs/agent.md`` must exist at the top, beside the
    doc or in docs/; nothing may point outside the repository (``../shared/…``
    exists on a developer's machine, not in a clone).
    """
    missing: list[str] = []
    for link in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z][a-z0-9+.-]*:", link) or link.startswith("#"):
            continue  # a URL or an anchor of the same page
        target = (doc.parent / link.split("#")[0]).resolve()
        if not target.is_relative_to(ROOT) or not target.exists():
            missing.append(link)
    for name in re.findall(r"(?<![\w/.-])((?:\.\./|\./)*(?:[\w.-]+/)*[A-Za-z][\w-]*\.md)\b", text):
        places = (ROOT / name, doc.parent / name, ROOT / "docs" / name)
        if name.startswith("../") or not any(
            p.resolve().is_relative_to(ROOT) and p.exists() for p in places
        ):
            missing.append(name)
    return missing


def test_the_reference_check_catches_files_outside_the_repository() -> None:
    doc = ROOT / "docs" / "agent.md"
    text = (
        'DESIGN.md ("The device agent") states the invariants; `../shared/DESIGN.md` the why; '
        "see [STYLE](../STYLE.md), [the agent](agent.md#layout), docs/repository.md, "
        "[a site](https://example.com/x.md) and [this](#commands)."
    )
    assert set(missing_references(doc, text)) == {"DESIGN.md", "../shared/DESIGN.md", "../STYLE.md"}


def test_docs_link_and_cite_only_files_in_the_repository() -> None:
    for doc in DOCS:
        missing = missing_references(doc, doc.read_text())
        assert not missing, (
            f"{doc.relative_to(ROOT)} links or cites {missing}, not in the repository"
        )


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
