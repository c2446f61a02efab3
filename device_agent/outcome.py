"""What one poll did for one model, as data and as one line for a person."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass
class Outcome:
    """What one poll did for one model."""

    model: str
    action: str  # up-to-date | installed | rolled-back | failed | kept | no-release | error
    revision: str | None = None
    version: str | None = None
    error: str | None = None
    checked: bool = True  # False when the repository could not be read at all

    def describe(self) -> str:
        """One line for a person: what happened to which release, and what runs now."""
        return describe_outcome(vars(self))

    def as_status(self) -> dict[str, Any]:
        """The fields this outcome contributes to the status document."""
        now = time.time()
        fields: dict[str, Any] = {
            "last_action": self.action,
            "last_error": self.error,
            "last_attempt": now,
        }
        if self.checked:
            fields["last_check"] = now
        return fields


_REFUSALS = frozenset({"failed", "kept", "no-release", "error"})


def describe_outcome(outcome: Mapping[str, Any]) -> str:
    """``Outcome`` fields (or their ``--json`` form) as one line for a person.

    A refusal names the release it refused and, apart from it, the revision that
    still runs, so "failed" never reads as if the running model had failed.
    """
    model, action = outcome.get("model"), outcome.get("action")
    revision, version, error = outcome.get("revision"), outcome.get("version"), outcome.get("error")
    if action not in _REFUSALS:
        return f"{model}: {action} {revision or version or '-'}"
    line = f"{model}: {action}"
    if version and action in ("failed", "kept"):
        line += f" {version}"
    if error:
        line += f" ({error})"
    return line + (f"; running {revision}" if revision else "; no model running")
