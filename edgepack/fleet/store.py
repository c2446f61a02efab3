"""The fleet store's one small interface, and what goes through it.

Two implementations, chosen by URL in :func:`edgepack.fleet.sql.open_store`:
``sqlite:///PATH`` (the default, one file, what ``make demo`` uses) and
``postgresql://…`` (production, through psycopg 3). Both run the same versioned
migrations (:mod:`edgepack.fleet.migrations`) and the same queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from edgepack.errors import EdgepackError


@dataclass(frozen=True)
class Device:
    """A registered device: its enrolment record's facts and where it stands."""

    device_id: str
    identity: bytes  # raw Ed25519 public key
    recipient: str  # "x25519:HEX" or ""
    models: tuple[str, ...]
    channel: str
    cohort: str
    profile: str
    architecture: str
    registered_at: float
    revoked_at: float | None = None
    revoked_reason: str = ""
    last_counter: int = 0
    last_seen: float | None = None


@dataclass(frozen=True)
class ModelState:
    """One device's last reported state of one model (a row per device and model)."""

    device_id: str
    model: str
    channel: str
    version: str | None
    revision: str | None
    state: str | None
    last_action: str | None
    last_error: str | None
    refused: dict[str, str]
    pending: str | None
    health_latency_ms: float | None
    stale: bool
    reported_at: float
    monitoring: dict[str, Any] | None = None
    """The model's ``monitoring`` entry as reported (fleetreport.MONITORING_KEYS), or None."""


@dataclass(frozen=True)
class Decision:
    """A rollout decision of ``fleet watch``: halt, rollback or widen, with its reason.

    ``(model, channel, version, action, step)`` is unique in the store: of two
    watchers deciding the same thing, one claims it and the other learns it lost.
    """

    model: str
    channel: str
    version: str
    action: str  # "halt" | "rollback" | "widen"
    step: float  # the rollout percentage the decision concerns (widen: the new one)
    reason: str
    decided_at: float
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReleaseHealth:
    """How one release of one model channel fares, from fresh reports only.

    ``running``: devices that run it; ``failed``: devices that refused it or whose
    health check failed it, by reason; ``installing``: devices with it pending;
    ``stale``: devices whose last report is older than the stale bound (or that
    say they are stale) — counted here but never in ``rate``. ``rate`` is
    failed / (failed + running), None when nothing fresh speaks of the release.
    """

    model: str
    channel: str
    version: str
    running: int
    failed: dict[str, int]
    installing: int
    stale: int

    @property
    def failures(self) -> int:
        """Devices that failed the release, whatever the reason."""
        return sum(self.failed.values())

    @property
    def rate(self) -> float | None:
        """The failure rate among fresh devices that ran or tried the release."""
        total = self.running + self.failures
        return None if total == 0 else self.failures / total


STATUS_COLUMNS = (
    "device_id",
    "models",  # the device's registered models, as JSON text (None beside a state)
    "device_channel",  # the device's registered channel (None beside a state)
    "last_seen",
    "revoked_at",
    "model",
    "channel",
    "version",
    "pending",
    "state",
    "last_action",
    "last_error",
    "refused",  # JSON text
    "stale",  # 0 or 1
    "reported_at",
    "revision",  # the revision the device runs
    "monitoring",  # the model's monitoring entry, as JSON text (None when not reported)
)
"""The columns of :meth:`FleetStore.status_rows`, in order."""


class StoreUnavailableError(EdgepackError):
    """The database cannot be reached or failed mid-transaction: nothing was stored."""


class RefusedError(Exception):
    """A report the store will not take: ``code`` is the HTTP status, ``reason`` a word."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class FleetStore(Protocol):
    """What the service, the CLI and ``fleet watch`` need of a fleet database."""

    url: str

    def migrate(self) -> int:
        """Bring the schema to the newest version; return it (idempotent)."""

    def register(self, device: Device) -> bool:
        """Add a device (True) or update a registered one's record (False).

        A revoked device stays revoked: raises InvalidInputError.
        """

    def revoke(self, device_id: str, reason: str, at: float) -> bool:
        """Mark a device revoked (its reports are refused from now on); False if unknown."""

    def device(self, device_id: str) -> Device | None:
        """One device, or None."""

    def devices(self) -> list[Device]:
        """Every registered device, by id."""

    def ingest(
        self, device_id: str, counter: int, received_at: float, report: dict[str, Any], raw: bytes
    ) -> None:
        """Store a verified report, atomically: the counter must exceed the device's
        last (else RefusedError(409, "replayed")), the device must be registered and not
        revoked (else RefusedError(403, ...)). Returns only after the commit: a report
        acknowledged is a report kept."""

    def states(self, model: str | None = None, channel: str | None = None) -> list[ModelState]:
        """The last reported state of every (device, model), filtered."""

    def status_rows(
        self, model: str | None = None, channel: str | None = None
    ) -> list[tuple[Any, ...]]:
        """What ``fleet status`` reads, in one query (fast at 100k devices): a row per
        device and reported model matching the filter, or one row with the state's
        columns None for a device with no such state; a device's rows together, by id.
        The columns are :data:`STATUS_COLUMNS`."""

    def last_report(self, device_id: str) -> dict[str, Any] | None:
        """The device's last stored report document, or None."""

    def claim(self, decision: Decision) -> bool:
        """Record a decision; False when an equal one (same key) is already recorded."""

    def decisions(self, model: str | None = None) -> list[Decision]:
        """Every recorded decision, oldest first."""

    def close(self) -> None:
        """Release the connection."""
