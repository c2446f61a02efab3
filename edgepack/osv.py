"""Match installed Python packages against OSV advisories read from a local directory.

The advisories are OSV-format JSON records (https://ossf.github.io/osv-schema/)
that the operator's own mirror job keeps in a directory; nothing here reaches the
network. Reading is bounded and forgiving: a file that is too large, does not
parse, lacks ``id``/``affected``, names an ecosystem OSV does not define, or holds
a version that is not PEP 440 is skipped and recorded with a one-line reason, and
the scan goes on, so one bad record never hides the others.

Only the ``PyPI`` ecosystem is matched (the components a bundle records are Python
packages): package names are compared after PEP 503 normalisation and versions
with :class:`packaging.version.Version`, never as strings, so ``2.6.0rc1`` sorts
before ``2.6.0`` and ``2.10`` after ``2.9``.

Severity comes from ``database_specific.severity`` (GitHub's CRITICAL, HIGH,
MODERATE, LOW) when the record has it, else from a CVSS v3.0/v3.1 vector in
``severity[]``, whose base score is computed here (CVSS v3.1 specification,
section 7) and mapped to a level by the specification's bands. A record with
neither (or only a CVSS v4 vector, which is not computed) has severity
``unknown``.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

MAX_FILE_BYTES = 4 * 1024 * 1024
"""Advisory files larger than this are skipped unread (OSV records are a few KiB)."""

SEVERITY_LEVELS = ("low", "moderate", "high", "critical")
"""Severity levels from least to most severe; ``unknown`` sits outside the scale."""

UNKNOWN = "unknown"

# The ecosystems the OSV schema defines (the part before any ``:`` suffix).
KNOWN_ECOSYSTEMS = frozenset(
    {
        "AlmaLinux", "Alpine", "Android", "Bioconductor", "Bitnami", "Chainguard",
        "CRAN", "crates.io", "Debian", "GHC", "GitHub Actions", "Go", "Hackage",
        "Hex", "Linux", "Mageia", "Maven", "MinimOS", "npm", "NuGet", "openEuler",
        "openSUSE", "OSS-Fuzz", "Packagist", "Photon OS", "Pub", "PyPI", "Red Hat",
        "Rocky Linux", "RubyGems", "SUSE", "SwiftURL", "Ubuntu", "Wolfi", "GIT",
    }
)  # fmt: skip

_GITHUB_LEVELS = {
    "CRITICAL": "critical",
    "HIGH": "high",
    "MODERATE": "moderate",
    "MEDIUM": "moderate",
    "LOW": "low",
}


def normalize_name(name: str) -> str:
    """A package name per PEP 503: runs of ``-``, ``_`` and ``.`` become one ``-``, lower case."""
    return re.sub(r"[-_.]+", "-", name).lower()


def severity_rank(level: str) -> int:
    """Position of a level on the scale; ``unknown`` ranks above every level.

    An advisory nobody rated is not assumed harmless: it counts as at or above
    any ``--fail-on`` threshold.
    """
    if level in SEVERITY_LEVELS:
        return SEVERITY_LEVELS.index(level)
    return len(SEVERITY_LEVELS)


@dataclass(frozen=True)
class Skipped:
    """Something the scan could not use, and why (one line)."""

    source: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        """JSON-friendly form."""
        return {"source": self.source, "reason": self.reason}

    def line(self) -> str:
        """One line for a person."""
        return f"{self.source}: {self.reason}"


@dataclass(frozen=True)
class Finding:
    """An installed package version that an advisory says is affected."""

    advisory_id: str
    aliases: tuple[str, ...]
    summary: str
    severity: str
    package: str
    version: str
    fixed: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "id": self.advisory_id,
            "aliases": list(self.aliases),
            "summary": self.summary,
            "severity": self.severity,
            "package": self.package,
            "version": self.version,
            "fixed": list(self.fixed),
        }


@dataclass(frozen=True)
class _Event:
    kind: str  # introduced, fixed or last_affected
    version: Version | None  # None: introduced "0", below every version


@dataclass(frozen=True)
class _Affected:
    package: str  # PEP 503 normalised
    ranges: tuple[tuple[_Event, ...], ...]
    versions: frozenset[Version]

    def matches(self, version: Version) -> bool:
        if version in self.versions:
            return True
        return any(_in_range(version, events) for events in self.ranges)

    def fixed(self) -> list[str]:
        return [str(e.version) for r in self.ranges for e in r if e.kind == "fixed" and e.version]


def _in_range(version: Version, events: tuple[_Event, ...]) -> bool:
    """OSV's range evaluation: walk the events in version order, toggling affected."""
    affected = False
    for event in events:
        if event.kind == "introduced":
            if event.version is None or version >= event.version:
                affected = True
        elif event.kind == "fixed":
            if event.version is not None and version >= event.version:
                affected = False
        elif event.version is not None and version > event.version:  # last_affected
            affected = False
    return affected


@dataclass(frozen=True)
class Advisory:
    """One OSV record, reduced to what matching needs."""

    advisory_id: str
    aliases: tuple[str, ...]
    summary: str
    severity: str
    affected: tuple[_Affected, ...] = field(repr=False)

    def match(self, package: str, version: Version, shown: str) -> Finding | None:
        """The finding for ``package`` at ``version`` (``shown`` as recorded), or None."""
        name = normalize_name(package)
        hits = [a for a in self.affected if a.package == name and a.matches(version)]
        if not hits:
            return None
        fixed = sorted({f for a in hits for f in a.fixed()}, key=Version)
        return Finding(
            self.advisory_id,
            self.aliases,
            self.summary,
            self.severity,
            package,
            shown,
            tuple(fixed),
        )


class _BadRecordError(Exception):
    """A record that cannot be used; its message is the one-line reason."""


@dataclass
class AdvisoryDatabase:
    """The advisories read from a directory, and what was skipped reading it."""

    advisories: list[Advisory]
    skipped: list[Skipped]

    def match(self, components: Mapping[str, str]) -> tuple[list[Finding], list[Skipped]]:
        """Findings for ``components`` (package → version), most severe first.

        A component whose version is not PEP 440 cannot be compared: it is
        returned as skipped rather than guessed at.
        """
        findings: list[Finding] = []
        skipped: list[Skipped] = []
        for package, shown in sorted(components.items()):
            try:
                version = Version(shown)
            except InvalidVersion:
                skipped.append(Skipped(f"{package} {shown}", "version is not PEP 440"))
                continue
            seen: set[str] = set()
            for advisory in self.advisories:
                finding = advisory.match(package, version, shown)
                if finding is not None and finding.advisory_id not in seen:
                    seen.add(finding.advisory_id)
                    findings.append(finding)
        findings.sort(key=lambda f: (-severity_rank(f.severity), f.package, f.advisory_id))
        return findings, skipped


def load_advisories(directory: Path) -> AdvisoryDatabase:
    """Read every ``*.json`` under ``directory`` (recursively): one record or a list per file.

    Symbolic links and non-regular files are skipped, like oversize and
    malformed files; each skip is recorded with its reason. The caller checks
    that ``directory`` exists.
    """
    advisories: list[Advisory] = []
    skipped: list[Skipped] = []
    for path in sorted(_json_files(directory)):
        shown = str(path)
        try:
            info = path.lstat()
        except OSError as exc:
            skipped.append(Skipped(shown, f"cannot read: {exc.strerror}"))
            continue
        if not stat.S_ISREG(info.st_mode):
            skipped.append(Skipped(shown, "not a regular file"))
            continue
        if info.st_size > MAX_FILE_BYTES:
            skipped.append(Skipped(shown, f"larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB"))
            continue
        try:
            with open(path, "rb") as handle:
                data = handle.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            skipped.append(Skipped(shown, f"cannot read: {exc.strerror}"))
            continue
        if len(data) > MAX_FILE_BYTES:
            skipped.append(Skipped(shown, f"larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB"))
            continue
        try:
            document = json.loads(data)
        except (ValueError, RecursionError) as exc:
            skipped.append(Skipped(shown, f"not valid JSON: {str(exc).splitlines()[0][:120]}"))
            continue
        records = document if isinstance(document, list) else [document]
        for index, record in enumerate(records):
            where = shown if len(records) == 1 else f"{shown}[{index}]"
            try:
                advisories.append(parse_advisory(record))
            except _BadRecordError as exc:
                skipped.append(Skipped(where, str(exc)))
    return AdvisoryDatabase(advisories, skipped)


def _json_files(directory: Path) -> Iterable[Path]:
    for root, dirs, files in os.walk(directory):  # os.walk does not follow directory links
        dirs.sort()
        for name in files:
            if name.endswith(".json"):
                yield Path(root) / name


def parse_advisory(record: object) -> Advisory:
    """One OSV record as an :class:`Advisory`; raises :class:`_BadRecordError` with the reason."""
    if not isinstance(record, dict):
        raise _BadRecordError("record is not a JSON object")
    advisory_id = record.get("id")
    if not isinstance(advisory_id, str) or not advisory_id:
        raise _BadRecordError("record has no 'id'")
    affected = record.get("affected")
    if not isinstance(affected, list) or not affected:
        raise _BadRecordError(f"{advisory_id}: record has no 'affected' list")
    aliases = record.get("aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise _BadRecordError(f"{advisory_id}: 'aliases' is not a list of strings")
    summary = record.get("summary")
    if not isinstance(summary, str):
        details = record.get("details")
        summary = details.strip().splitlines()[0] if isinstance(details, str) and details else ""
    entries = tuple(e for e in (_parse_affected(advisory_id, a) for a in affected) if e)
    return Advisory(advisory_id, tuple(aliases), summary.strip(), _severity(record), entries)


def _parse_affected(advisory_id: str, entry: object) -> _Affected | None:
    """A PyPI ``affected[]`` entry, None for another known ecosystem."""
    if not isinstance(entry, dict) or not isinstance(entry.get("package"), dict):
        raise _BadRecordError(f"{advisory_id}: an 'affected' entry has no 'package'")
    package = entry["package"]
    ecosystem, name = package.get("ecosystem"), package.get("name")
    if not isinstance(ecosystem, str) or not isinstance(name, str):
        raise _BadRecordError(f"{advisory_id}: an 'affected' package lacks 'ecosystem' or 'name'")
    if ecosystem.split(":", 1)[0] not in KNOWN_ECOSYSTEMS:
        raise _BadRecordError(f"{advisory_id}: unknown ecosystem {ecosystem[:60]!r}")
    if ecosystem != "PyPI":
        return None
    ranges = []
    for item in entry.get("ranges") or []:
        if not isinstance(item, dict):
            raise _BadRecordError(f"{advisory_id}: a range is not an object")
        if item.get("type") != "ECOSYSTEM":
            continue  # GIT and SEMVER ranges do not describe PyPI releases
        events = item.get("events")
        if not isinstance(events, list) or not events:
            raise _BadRecordError(f"{advisory_id}: an ECOSYSTEM range has no events")
        ranges.append(_parse_events(advisory_id, events))
    versions = entry.get("versions") or []
    if not isinstance(versions, list):
        raise _BadRecordError(f"{advisory_id}: 'versions' is not a list")
    return _Affected(
        normalize_name(name),
        tuple(ranges),
        frozenset(_version(advisory_id, v) for v in versions),
    )


def _parse_events(advisory_id: str, events: list[object]) -> tuple[_Event, ...]:
    parsed: list[_Event] = []
    for event in events:
        if not isinstance(event, dict) or len(event) != 1:
            raise _BadRecordError(f"{advisory_id}: a range event is not a one-key object")
        ((kind, value),) = event.items()
        if kind == "limit":
            continue  # limits bound GIT ranges only
        if kind not in ("introduced", "fixed", "last_affected"):
            raise _BadRecordError(f"{advisory_id}: unknown range event {str(kind)[:40]!r}")
        if kind == "introduced" and value == "0":
            parsed.append(_Event(kind, None))
        else:
            parsed.append(_Event(kind, _version(advisory_id, value)))
    # OSV does not require events in order; evaluation walks them sorted by version.
    parsed.sort(key=lambda e: (e.version is not None, e.version or Version("0")))
    return tuple(parsed)


def _version(advisory_id: str, value: object) -> Version:
    if not isinstance(value, str):
        raise _BadRecordError(f"{advisory_id}: a version is not a string")
    try:
        return Version(value)
    except InvalidVersion:
        raise _BadRecordError(f"{advisory_id}: version {value[:40]!r} is not PEP 440") from None


def _severity(record: dict[str, Any]) -> str:
    specific = record.get("database_specific")
    if isinstance(specific, dict):
        level = specific.get("severity")
        if isinstance(level, str) and level.upper() in _GITHUB_LEVELS:
            return _GITHUB_LEVELS[level.upper()]
    for item in record.get("severity") or []:
        if isinstance(item, dict) and item.get("type") == "CVSS_V3":
            score = cvss3_base_score(str(item.get("score", "")))
            if score is not None:
                return level_for_score(score)
    return UNKNOWN


def level_for_score(score: float) -> str:
    """CVSS qualitative band: 9.0+ critical, 7.0+ high, 4.0+ moderate ("medium"), else low."""
    if score >= 9.0:
        return "critical"
    if score >= 7.0:
        return "high"
    if score >= 4.0:
        return "moderate"
    return "low"


_CVSS_WEIGHTS: dict[str, dict[str, float]] = {
    "AV": {"N": 0.85, "A": 0.62, "L": 0.55, "P": 0.2},
    "AC": {"L": 0.77, "H": 0.44},
    "UI": {"N": 0.85, "R": 0.62},
    "C": {"H": 0.56, "L": 0.22, "N": 0.0},
    "I": {"H": 0.56, "L": 0.22, "N": 0.0},
    "A": {"H": 0.56, "L": 0.22, "N": 0.0},
}
_CVSS_PR = {"U": {"N": 0.85, "L": 0.62, "H": 0.27}, "C": {"N": 0.85, "L": 0.68, "H": 0.5}}


def _roundup(value: float) -> float:
    """CVSS v3.1 Roundup: the smallest one-decimal number not below ``value``."""
    scaled = round(value * 100000)
    if scaled % 10000 == 0:
        return scaled / 100000.0
    return (math.floor(scaled / 10000) + 1) / 10.0


def cvss3_base_score(vector: str) -> float | None:
    """The CVSS v3.x base score of a vector string, None if it is not a valid base vector."""
    parts = vector.split("/")
    if not parts or parts[0] not in ("CVSS:3.0", "CVSS:3.1"):
        return None
    metrics: dict[str, str] = {}
    for part in parts[1:]:
        key, sep, value = part.partition(":")
        if not sep or key in metrics:
            return None
        metrics[key] = value
    scope = metrics.get("S")
    if scope not in _CVSS_PR or metrics.get("PR") not in _CVSS_PR[scope]:
        return None
    try:
        w = {key: table[metrics[key]] for key, table in _CVSS_WEIGHTS.items()}
    except KeyError:
        return None
    iss = 1 - (1 - w["C"]) * (1 - w["I"]) * (1 - w["A"])
    changed = 7.52 * (iss - 0.029) - 3.25 * (iss - 0.02) ** 15
    impact = 6.42 * iss if scope == "U" else changed
    exploitability = 8.22 * w["AV"] * w["AC"] * _CVSS_PR[scope][metrics["PR"]] * w["UI"]
    if impact <= 0:
        return 0.0
    if scope == "U":
        return _roundup(min(impact + exploitability, 10))
    return _roundup(min(1.08 * (impact + exploitability), 10))


__all__ = [
    "MAX_FILE_BYTES",
    "SEVERITY_LEVELS",
    "Advisory",
    "AdvisoryDatabase",
    "Finding",
    "Skipped",
    "cvss3_base_score",
    "level_for_score",
    "load_advisories",
    "normalize_name",
    "parse_advisory",
    "severity_rank",
]
