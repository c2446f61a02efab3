"""The one version rule: PEP 440 (``packaging.version``), for every version the agent compares.

``min_agent_version`` in a bundle is compared with the agent's own version by
this rule alone, so ``0.1.0rc9`` sorts before ``0.1.0``, ``0.1.0.0`` equals it
and ``0.2-rc1`` is ``0.2rc1`` (not 0.21). Text that is not a PEP 440 version —
or longer than any real one — is refused with a clear error, never a crash.
"""

from __future__ import annotations

from packaging.version import InvalidVersion, Version

from edgepack.errors import InvalidInputError

MAX_VERSION_CHARS = 64


def parse(text: str, what: str = "version") -> Version:
    """``text`` as a PEP 440 version, or :class:`InvalidInputError`."""
    if not isinstance(text, str) or len(text) > MAX_VERSION_CHARS:
        raise InvalidInputError(
            f"{what} is not a PEP 440 version of at most {MAX_VERSION_CHARS} characters"
        )
    try:
        if text != text.strip():  # packaging forgives surrounding space; a bundle field must not
            raise InvalidVersion(text)
        return Version(text)
    except (InvalidVersion, ValueError):
        raise InvalidInputError(
            f"{what} {text!r} is not a PEP 440 version", hint="use e.g. 1.2.0, 1.2.0rc1"
        ) from None


def at_least(have: str, needed: str) -> bool:
    """True when version ``have`` is ``needed`` or newer (both PEP 440)."""
    return parse(have) >= parse(needed, "min_agent_version")
