"""The device's signed reports to its fleet, built from ``DATA/status.json`` and queued on disk.

A report (:mod:`edgepack.fleetreport` defines the format) says per followed model
what runs, what is pending, the last outcome and what was refused; never an
input, an output or a byte of a model. It is built here, signed with the
identity key ``DATA/keys/identity.key`` and written to
``DATA/reports/queue/COUNTER.json``; :mod:`device_agent.reporter` sends the
queue. Everything in this module is local and quick (no network), so the poll
thread can queue a report and go on.

The counter is ``max(stored + 1, newest queued + 1, microseconds since the
epoch)``, written to ``DATA/reports/counter`` before the report is queued: it
grows across restarts, and still grows if the file is lost (the clock carries
it), which the service's replay check needs.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import logging
import os
import sys
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from device_agent import _atomic
from device_agent import status as status_mod
from device_agent.config import AgentConfig
from device_agent.errors import AgentError, ConfigError
from edgepack import fleetreport
from edgepack._version import __version__
from edgepack.channel import rollout_bucket
from edgepack.errors import InvalidInputError

log = logging.getLogger(__name__)

REPORTS_DIR = "reports"
QUEUE_DIR = "queue"
COUNTER_NAME = "counter"
LOCK_NAME = ".lock"
IDENTITY_KEY = Path("keys") / "identity.key"
# A refusal's reason is cut shorter than other text, so a report of one model with a
# refused release and an error stays under 1 KB.
REFUSAL_TEXT = 120
_DIGITS = 20  # queue file names: the counter zero-padded, so names sort as counters do
_RUNTIME = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "cryptography": ("cryptography",),
    "tuf": ("tuf",),
}


class NoFleetError(AgentError):
    """The device reports to no fleet service (no ``fleet_url``): a usage error."""

    exit_code = 2


@dataclass(frozen=True)
class Queued:
    """A report waiting in the queue: its counter, file, signature header and body."""

    counter: int
    path: Path
    signature: str
    body: bytes


def check_fleet_url(fleet_url: str, what: str = "fleet_url") -> str:
    """``fleet_url`` without its trailing slash, refused unless it is http:// or https://
    with a host (``""`` stays ``""``: no fleet service)."""
    if not fleet_url:
        return ""
    try:
        parts = urllib.parse.urlsplit(fleet_url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise InvalidInputError(f"{what} {fleet_url!r} is not a valid URL: {exc}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidInputError(
            f"{what} {fleet_url!r}: the fleet service is reached over http:// or https:// only"
        )
    if not parts.hostname:
        raise InvalidInputError(f"{what} {fleet_url!r} names no host")
    return fleet_url.rstrip("/")


def reports_dir(data_dir: Path) -> Path:
    """``DATA/reports``: the counter and the queue."""
    return data_dir / REPORTS_DIR


def queue_dir(data_dir: Path) -> Path:
    """``DATA/reports/queue``: one file per report not yet taken by the service."""
    return reports_dir(data_dir) / QUEUE_DIR


@cache
def runtime() -> dict[str, str]:
    """Versions of what runs the agent and its models, read once from the installed
    distributions' metadata (nothing is imported)."""
    versions = {"python": ".".join(str(p) for p in sys.version_info[:3])}
    for name, dists in _RUNTIME.items():
        for dist in dists:
            try:
                versions[name] = fleetreport.cut(importlib.metadata.version(dist), 64) or ""
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def _refused(failed: object) -> dict[str, str]:
    """The newest :data:`~edgepack.fleetreport.MAX_REFUSED` refused versions, reasons cut.

    ``failed_releases`` keeps insertion order (the journal adds a failure at the
    end), so the last entries are the newest.
    """
    if not isinstance(failed, dict):
        return {}
    items = [(str(v), str(why)) for v, why in failed.items()][-fleetreport.MAX_REFUSED :]
    return {
        fleetreport.cut(v, 64) or "": fleetreport.cut(why, REFUSAL_TEXT) or "" for v, why in items
    }


def _text(value: object, limit: int = 128) -> str | None:
    return None if value is None else fleetreport.cut(value, limit)


def _model(name: str, config: AgentConfig, entry: Mapping[str, Any], stale: bool) -> dict[str, Any]:
    """One model's part of a report, from its status entry."""
    revision = entry.get("revision")
    channel_version = entry.get("channel_version")
    bucket = (
        rollout_bucket(name, channel_version, config.device_id)
        if isinstance(channel_version, str) and channel_version
        else None
    )
    latencies = entry.get("health_latency_ms")
    latency = latencies.get(revision) if isinstance(latencies, dict) and revision else None
    watch = _monitoring(entry.get("monitoring"), revision)
    return {
        **({"monitoring": watch} if watch is not None else {}),
        "channel": config.channel,
        "revision": _text(revision),
        "version": _text(entry.get("version")),
        "cohort_bucket": bucket,
        "state": _text(entry.get("state")),
        "pending": _text(entry.get("pending")),
        "last_action": _text(entry.get("last_action")),
        "last_error": fleetreport.cut(entry.get("last_error")),
        "refused": _refused(entry.get("failed_releases")),
        "health_latency_ms": latency if isinstance(latency, int | float) else None,
        # Stale: the last poll could not read the repository, or none ever did.
        "stale": stale or not isinstance(entry.get("last_check"), int | float),
    }


def _window(raw: object) -> dict[str, Any] | None:
    """A revision's last scored monitoring window in the report's terms, or None."""
    if not isinstance(raw, dict) or not isinstance(raw.get("rows"), int):
        return None
    figures = [raw.get(k) for k in ("drift_psi", "max_feature_psi", "anomaly_rate")]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in figures):
        return None
    confidence = raw.get("mean_confidence")
    kinds: list[str] = []
    for alert in raw.get("alerts") or []:
        kind = alert.get("kind") if isinstance(alert, dict) else None
        if kind in fleetreport.ALERT_KINDS and kind not in kinds:
            kinds.append(kind)
    return {
        "revision": _text(raw.get("revision")),
        "rows": raw["rows"],
        "drift_psi": figures[0],
        "max_feature_psi": figures[1],
        "anomaly_rate": figures[2],
        "mean_confidence": confidence if isinstance(confidence, int | float) else None,
        "alerts": kinds[: fleetreport.MAX_ALERTS],
    }


def _monitoring(raw: object, revision: object) -> dict[str, Any] | None:
    """The ``monitoring`` entry of a model (with ``previous`` when that revision has
    scored a window); None before the running revision has scored one."""
    current = _window(raw)
    if current is None or current["revision"] != revision or not isinstance(raw, dict):
        return None
    previous = _window(raw.get("previous"))
    if previous is not None:
        current["previous"] = previous
    return current


def content(
    config: AgentConfig, status: Mapping[str, Any], *, profile: str, architecture: str
) -> dict[str, Any]:
    """A report's document without its counter and time: what changes when the device does."""
    models = status.get("models")
    models = models if isinstance(models, dict) else {}
    stale = bool(status.get("stale"))
    return {
        "format": fleetreport.REPORT_FORMAT,
        "format_version": fleetreport.FORMAT_VERSION,
        "device_id": config.device_id,
        "agent_version": __version__,
        "profile": fleetreport.cut(profile, 64) or "",
        "architecture": fleetreport.cut(architecture, 64) or "",
        "runtime": runtime(),
        "models": {
            name: _model(name, config, models.get(name) or {}, stale)
            for name in config.models[: fleetreport.MAX_MODELS]
        },
    }


def load_identity(data_dir: Path) -> ed25519.Ed25519PrivateKey:
    """The device's identity key, which signs its reports."""
    path = data_dir / IDENTITY_KEY
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"cannot use the identity key {path} to sign reports: {exc}",
            hint="enrol again (`edgepack-agent enroll`) to make it",
        ) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 identity key")
    return key


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[Path]:
    """Hold ``DATA/reports/.lock``: the daemon and ``edgepack-agent report`` never take the
    same counter. Not ``DATA/.lock``, so a report never waits for a poll."""
    folder = queue_dir(data_dir)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(reports_dir(data_dir) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield folder
    finally:
        os.close(fd)


def _stored_counter(data_dir: Path) -> int:
    try:
        return int((reports_dir(data_dir) / COUNTER_NAME).read_text("ascii").strip())
    except (OSError, ValueError):
        return 0


def _queue_files(folder: Path) -> list[Path]:
    """The queued reports, oldest (smallest counter) first."""
    try:
        names = [p for p in folder.iterdir() if p.suffix == ".json" and p.stem.isdigit()]
    except FileNotFoundError:
        return []
    return sorted(names, key=lambda p: int(p.stem))


def next_counter(data_dir: Path, now_ns: int | None = None) -> int:
    """Take the next counter and store it (atomically, before any report carries it)."""
    with _locked(data_dir):
        return _take_counter(data_dir, now_ns)


def _take_counter(data_dir: Path, now_ns: int | None = None) -> int:
    """:func:`next_counter` for a caller that holds :func:`_locked`."""
    queued = _queue_files(queue_dir(data_dir))
    newest = int(queued[-1].stem) if queued else 0
    clock = (time.time_ns() if now_ns is None else now_ns) // 1000
    counter = max(_stored_counter(data_dir) + 1, newest + 1, clock)
    _atomic.write_bytes(
        reports_dir(data_dir) / COUNTER_NAME, f"{counter}\n".encode("ascii"), mode=0o600
    )
    return counter


class Queue:
    """The on-disk queue of signed reports, bounded at ``report_queue_max``."""

    def __init__(self, config: AgentConfig, key: ed25519.Ed25519PrivateKey | None = None) -> None:
        self.config = config
        self.data = config.data_dir
        self.key = key or load_identity(self.data)
        self._dropping = False  # the overflow is logged once, until a send succeeds

    def put(self, document: Mapping[str, Any], *, now: float | None = None) -> Queued:
        """Give ``document`` (a report's :func:`content`) its counter and time, sign it,
        queue it, and drop the oldest reports beyond the bound."""
        with _locked(self.data) as folder:
            counter = _take_counter(self.data)
            report = {**document, "counter": counter, "time": round(now or time.time(), 3)}
            body = fleetreport.canonical(report)
            signature = fleetreport.sign(self.key, body)
            path = folder / f"{counter:0{_DIGITS}d}.json"
            line = f"{fleetreport.SIGNATURE_HEADER}: {signature}\n".encode("ascii")
            self._make_room(folder)  # first, so the queue never holds more than its bound
            _atomic.write_bytes(path, line + body, mode=0o600)
        return Queued(counter, path, signature, body)

    def _make_room(self, folder: Path) -> None:
        """Drop the oldest reports so one more fits within ``report_queue_max``."""
        files = _queue_files(folder)
        excess = len(files) + 1 - max(1, self.config.limits.report_queue_max)
        if excess <= 0:
            return
        if not self._dropping:
            log.warning(
                "the report queue holds %d reports, its bound (report_queue_max): "
                "dropping the oldest while the fleet service cannot be reached",
                self.config.limits.report_queue_max,
            )
            self._dropping = True
        for path in files[:excess]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def sent(self) -> None:
        """A report reached the service: the next overflow is worth saying again."""
        self._dropping = False

    def pending(self) -> list[Queued]:
        """The queued reports, oldest first (a file that cannot be read is removed)."""
        out: list[Queued] = []
        for path in _queue_files(queue_dir(self.data)):
            queued = read(path)
            if queued is None:
                log.warning("removing the unreadable queued report %s", path.name)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            out.append(queued)
        return out


def read(path: Path) -> Queued | None:
    """A queued report from its file; ``None`` when the file is gone or damaged."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    line, sep, body = data.partition(b"\n")
    prefix = f"{fleetreport.SIGNATURE_HEADER}: ".encode("ascii")
    if not sep or not line.startswith(prefix) or not body:
        return None
    return Queued(int(path.stem), path, line[len(prefix) :].decode("ascii", "replace"), body)


def queue_now(config: AgentConfig, *, profile: str, architecture: str) -> Queued:
    """Build a report from ``DATA/status.json`` and queue it (``edgepack-agent report``)."""
    doc = content(
        config, status_mod.load(config.data_dir), profile=profile, architecture=architecture
    )
    return Queue(config).put(doc)
