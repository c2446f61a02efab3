"""The names the agent turns into paths: model, channel, cohort, revision and bundle digest.

Each comes from outside the agent's own code — the enrolment's command line,
``config.toml``, the journal, signed TUF metadata — and ends up in a path under
DATA that the agent creates and deletes. ``../x``, ``..``, ``""`` or a name
with a newline would point those deletions elsewhere, so every name is checked
here, with the builder's own rules, at enrolment, when the configuration and
the journal are read, and before a download is named after its digest.
"""

from __future__ import annotations

import re

from edgepack.bundle.metadata import NAME_RE
from edgepack.channel import check_channel_name
from edgepack.errors import InvalidInputError

_COHORT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# A revision folder is VERSION-SHA12 (agent.py); a version follows the bundle format's rule.
_REVISION_RE = re.compile(r"[0-9A-Za-z](?:[0-9A-Za-z.+_-]{0,62}[0-9A-Za-z])?-[0-9a-f]{12}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def model(name: str) -> str:
    """``name`` if it is a model name the builder could have packed, else raise."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidInputError(
            f"invalid model name {name!r}",
            hint="model names are lowercase letters, digits and dashes, up to 64 characters",
        )
    return name


def channel(name: str) -> str:
    """``name`` if it is one of the four risk levels, else raise."""
    return check_channel_name(name)


def cohort(name: str) -> str:
    """``name`` if it is empty (no cohort) or a cohort name, else raise."""
    if not isinstance(name, str) or (name and not _COHORT_RE.fullmatch(name)) or ".." in name:
        raise InvalidInputError(
            f"invalid cohort {name!r}",
            hint="use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name


def revision(name: str) -> str:
    """``name`` if it is a revision folder name (``VERSION-SHA12``), else raise."""
    if not isinstance(name, str) or not _REVISION_RE.fullmatch(name) or ".." in name:
        raise InvalidInputError(f"invalid revision name {name!r}")
    return name


def sha256(digest: str) -> str:
    """``digest`` if it is 64 lowercase hex characters, else raise.

    TUF accepts any string as a hash value; the agent names downloads after it.
    """
    if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
        raise InvalidInputError(
            f"the TUF sha256 {digest[:80]!r} is not 64 lowercase hex characters"
            if isinstance(digest, str)
            else "the TUF sha256 is not a string"
        )
    return digest
