"""The repository's working directory layout and its settings file (``repo.toml``).

The served tree (``public/``) holds only what devices may read; private keys
live in ``keys/`` beside it, never inside it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.errors import InvalidInputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = "root"
TARGETS = "targets"
SNAPSHOT = "snapshot"
TIMESTAMP = "timestamp"
OPERATORS = "operators"
TOP_ROLES = (ROOT, TARGETS, SNAPSHOT, TIMESTAMP)
KEYED_ROLES = (ROOT, TARGETS, SNAPSHOT, TIMESTAMP, OPERATORS)
"""Roles whose keys the repository holds (model teams keep their own)."""
MODELS = "models"
"""Settings key for every model team role and its hash bins."""

DEFAULT_EXPIRY_DAYS: dict[str, float] = {
    ROOT: 365,
    TARGETS: 365,
    SNAPSHOT: 7,
    TIMESTAMP: 1,
    OPERATORS: 365,
    MODELS: 365,
}
DEFAULT_REFRESH_DAYS: dict[str, float] = {SNAPSHOT: 3, TIMESTAMP: 0.5}
DEFAULT_WARN_DAYS: dict[str, float] = {
    ROOT: 60,
    TARGETS: 60,
    SNAPSHOT: 2,
    TIMESTAMP: 0.25,
    OPERATORS: 30,
    MODELS: 30,
}
DEFAULT_MAX_PER_BIN = 64
"""A model role holding more targets than this is split into hash bins."""


@dataclass(frozen=True)
class RepoPaths:
    """Where everything of one repository lives."""

    workdir: Path

    @property
    def public(self) -> Path:
        return self.workdir / "public"

    @property
    def metadata(self) -> Path:
        return self.public / "metadata"

    @property
    def targets(self) -> Path:
        return self.public / "targets"

    @property
    def keys(self) -> Path:
        return self.workdir / "keys"

    @property
    def settings(self) -> Path:
        return self.workdir / "repo.toml"

    @property
    def lock(self) -> Path:
        return self.workdir / ".publish.lock"


@dataclass
class Settings:
    """Expiries, refresh windows, warnings, bin size and the role keys' locations.

    Key specs are paths relative to the working directory (PEM files) or
    securesystemslib signer URIs (``hsm:``, ``gcpkms:``, ``awskms:``, …).
    """

    expiry_days: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_EXPIRY_DAYS))
    refresh_days: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_REFRESH_DAYS))
    warn_days: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WARN_DAYS))
    max_per_bin: int = DEFAULT_MAX_PER_BIN
    keys: dict[str, list[str]] = field(default_factory=dict)
    root_threshold: int = 1

    def expiry_for(self, role: str) -> float:
        """Days a new version of ``role`` stays valid."""
        return self.expiry_days.get(role, self.expiry_days[MODELS])

    def warn_for(self, role: str) -> float:
        """Days before expiry when ``status`` starts warning about ``role``."""
        return self.warn_days.get(role, self.warn_days[MODELS])

    def to_toml(self) -> str:
        """The settings as TOML text (a fixed, simple shape we write ourselves)."""
        lines = [
            "# edgepack repository settings; see docs/repository.md",
            f"max_per_bin = {self.max_per_bin}",
            f"root_threshold = {self.root_threshold}",
            "",
        ]
        for table, values in (
            ("expiry_days", self.expiry_days),
            ("refresh_days", self.refresh_days),
            ("warn_days", self.warn_days),
        ):
            lines.append(f"[{table}]")
            lines += [f"{k} = {float(v)!r}" for k, v in sorted(values.items())]
            lines.append("")
        lines.append("[keys]")
        for role, specs in sorted(self.keys.items()):
            quoted = ", ".join(_toml_string(s) for s in specs)
            lines.append(f"{role} = [{quoted}]")
        return "\n".join(lines) + "\n"

    @classmethod
    def load(cls, paths: RepoPaths) -> Settings:
        """Read ``repo.toml``; a missing or malformed file is a clear error."""
        try:
            raw = tomllib.loads(paths.settings.read_text("utf-8"))
        except FileNotFoundError:
            raise InvalidInputError(
                f"{paths.workdir} is not an edgepack repository (no repo.toml)",
                hint="create one with: edgepack repo init WORKDIR",
            ) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise InvalidInputError(f"{paths.settings} is not valid TOML: {exc}") from None
        try:
            settings = cls()
            settings.max_per_bin = int(raw.get("max_per_bin", DEFAULT_MAX_PER_BIN))
            settings.root_threshold = int(raw.get("root_threshold", 1))
            for name in ("expiry_days", "refresh_days", "warn_days"):
                table: dict[str, Any] = raw.get(name, {})
                getattr(settings, name).update({k: float(v) for k, v in table.items()})
            settings.keys = {k: [str(s) for s in v] for k, v in raw.get("keys", {}).items()}
        except (TypeError, ValueError, AttributeError) as exc:
            raise InvalidInputError(f"{paths.settings} has a bad value: {exc}") from None
        if settings.max_per_bin < 1:
            raise InvalidInputError(f"{paths.settings}: max_per_bin must be at least 1")
        return settings


def _toml_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
