"""What one poll did for one model, as data and as one line for a person, and the
exit code of ``run --once`` that the outcomes of a poll add up to."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tuf.api import exceptions as tuf_exc

from edgepack.errors import EdgepackError

# The most severe first (docs/agent.md, "Exit codes"): the device's configuration,
# then its key, then a refused release, then anything else, then what a retry fixes.
SEVERITY = (3, 5, 4, 1, 6, 7)


@dataclass
class Outcome:
    """What one poll did for one model."""

    model: str
    action: str  # up-to-date | installed | rolled-back | failed | kept | no-release | error
    revision: str | None = None
    version: str | None = None
    error: str | None = None
    checked: bool = True  # False when the repository could not be read at all
    previous: str | None = None  # what ran before an install or a rollback
    exit_code: int = 0  # the exit code of the error class behind a refusal, 0 for none

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


def exit_code_of(exc: BaseException) -> int:
    """The documented exit code of what went wrong: an edgepack error's own; a TUF
    transport error 7; TUF metadata that fails verification or has expired 4; a
    full disk or another local failure 1."""
    if isinstance(exc, EdgepackError):
        return exc.exit_code
    if isinstance(exc, tuf_exc.DownloadError):
        return 7
    if isinstance(exc, tuf_exc.RepositoryError):
        return 4
    if isinstance(exc, ConnectionError | TimeoutError):
        return 7
    return 1


def exit_code(outcomes: Iterable[Outcome]) -> int:
    """The exit code of a poll: 0 when no model met a refusal with a code, else the most
    severe of their codes in :data:`SEVERITY` order."""
    codes = {o.exit_code for o in outcomes if o.exit_code}
    for code in SEVERITY:
        if code in codes:
            return code
    return max(codes, default=0)
