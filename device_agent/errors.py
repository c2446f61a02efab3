"""Errors of the device agent, by cause; the agent CLI catches them once."""

from __future__ import annotations

from edgepack.errors import EdgepackError


class AgentError(EdgepackError):
    """Base of the agent's own errors."""


class NotEnrolledError(AgentError):
    """The data directory holds no enrolment."""

    exit_code = 3
