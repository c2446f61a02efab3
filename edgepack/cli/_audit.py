"""``edgepack audit``: match the components bundles record against local OSV advisories.

For now the components are the tools a bundle's ``meta/bundle.json`` records
under ``provenance.tools`` (package → version). The advisories come from a local
directory that the operator's own mirror job refreshes; nothing here reaches
the network.

Exit codes: 0 when no finding is at or above ``--fail-on``, 4 when one is, 3
for bad input (no such directory, a file that is not a bundle).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from edgepack._cli_output import JSON_OPTION, emit
from edgepack.bundle import read_info
from edgepack.errors import InvalidInputError
from edgepack.osv import SEVERITY_LEVELS, Finding, Skipped, load_advisories, severity_rank

FAIL_EXIT = 4


def register(app: typer.Typer) -> None:
    """Add ``audit`` to ``app``."""
    app.command("audit")(audit_command)


def _components(
    info_metadata: dict[str, Any], bundle: Path
) -> tuple[dict[str, str], list[Skipped]]:
    """The package → version map a bundle's provenance records, and entries unusable as such."""
    provenance = info_metadata.get("provenance") or {}
    tools = provenance.get("tools") if isinstance(provenance, dict) else None
    if not isinstance(tools, dict):
        return {}, []
    components: dict[str, str] = {}
    skipped: list[Skipped] = []
    for package, version in tools.items():
        if isinstance(version, str):
            components[str(package)] = version
        else:
            skipped.append(Skipped(f"{bundle}: {package}", "recorded version is not a string"))
    return components, skipped


def audit_command(
    bundles: list[Path] = typer.Argument(..., help="Bundle files (.epk) to audit."),
    advisories: Path = typer.Option(
        ...,
        "--advisories",
        help="Directory of OSV advisory JSON files (a local mirror; read recursively).",
    ),
    fail_on: str = typer.Option(
        "high",
        "--fail-on",
        help="Exit 4 when a finding is at or above this severity: critical, high, moderate, low.",
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Report the advisories affecting the tool versions each bundle's provenance records."""
    if fail_on not in SEVERITY_LEVELS:
        raise InvalidInputError(
            f"unknown --fail-on level {fail_on!r}", hint=f"use one of {list(SEVERITY_LEVELS)}"
        )
    if not advisories.is_dir():
        raise InvalidInputError(
            f"{advisories} is not a directory",
            hint="pass --advisories DIR, the local directory your OSV mirror job fills",
        )
    infos = [read_info(path) for path in bundles]  # every bundle is checked before any output
    database = load_advisories(advisories)
    skipped = list(database.skipped)
    reports: list[dict[str, Any]] = []
    rows: list[tuple[str, Finding]] = []
    threshold = severity_rank(fail_on)
    failing = 0
    for info in infos:
        components, unusable = _components(info.metadata, info.path)
        findings, unmatched = database.match(components)
        skipped += unusable + [Skipped(f"{info.path}: {s.source}", s.reason) for s in unmatched]
        failing += sum(1 for f in findings if severity_rank(f.severity) >= threshold)
        rows += [(info.path.name, f) for f in findings]
        reports.append(
            {
                "path": str(info.path),
                "name": info.name,
                "version": info.version,
                "profile": info.profile,
                "components": components,
                "findings": [f.to_dict() for f in findings],
            }
        )
    for item in skipped:
        typer.echo(f"edgepack audit: skipped {item.line()}", err=True)

    def human() -> None:
        if not rows:
            typer.echo(
                f"no advisories affect the {sum(len(r['components']) for r in reports)} "
                f"recorded components of {len(reports)} bundle(s) "
                f"({len(database.advisories)} advisories read)"
            )
            return
        header = ("BUNDLE", "ADVISORY", "SEVERITY", "PACKAGE", "VERSION", "FIXED IN")
        table = [
            (bundle, f.advisory_id, f.severity, f.package, f.version, ", ".join(f.fixed) or "-")
            for bundle, f in rows
        ]
        widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
        for row in [header, *table]:
            typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        typer.echo(
            f"({len(rows)} findings, {failing} at or above {fail_on}; "
            f"{len(database.advisories)} advisories read, {len(skipped)} skipped)"
        )

    emit(
        {
            "bundles": reports,
            "advisories_read": len(database.advisories),
            "skipped": [s.to_dict() for s in skipped],
            "skipped_count": len(skipped),
            "fail_on": fail_on,
            "failing": failing,
        },
        as_json,
        human,
    )
    if failing:
        raise typer.Exit(FAIL_EXIT)


__all__ = ["audit_command", "register"]
