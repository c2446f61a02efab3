"""Errors of the device agent, by cause; the agent CLI catches them once."""

from __future__ import annotations

from edgepack.errors import EdgepackError, InvalidInputError, TransportError, VerificationError


class AgentError(EdgepackError):
    """Base of the agent's own errors."""


class NotEnrolledError(AgentError):
    """The data directory holds no enrolment."""

    exit_code = 3


class ConfigError(AgentError):
    """The device's own configuration (key, trust policy) is missing or unusable."""

    exit_code = 3


class UnsafeModelError(InvalidInputError):
    """A model refers to data outside its revision directory, or through a link."""


class HealthCheckError(AgentError):
    """A revision did not reproduce its golden outputs within tolerance or budget."""

    exit_code = 4


class NoSpaceError(AgentError):
    """The data directory lacks the free space an update needs."""


class DownloadFailedError(TransportError):
    """A download was cut, timed out, was too slow or too long."""


class NoRevisionError(AgentError):
    """The requested revision (or any active model) is not installed."""

    exit_code = 3


class CorruptRevisionError(AgentError):
    """An installed revision's files no longer match the manifest it was installed with."""

    exit_code = 4


class EncryptedAtRestError(AgentError):
    """The model is kept encrypted at rest: it has no plaintext file to hand out."""

    exit_code = 3


class EnvelopeError(VerificationError):
    """A key envelope is not this device's for this release: another device or key,
    another release or bundle (a replay), or it does not open."""
