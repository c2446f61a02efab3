"""How releases fare across the fleet: the figures ``fleet status``, the dashboard and
``fleet watch`` share.

Pure aggregation over one read of the store (``status_rows``: devices joined with
their model states, as plain rows; and, for the status, the decisions): no SQL here,
so both backends give the same figures, and one tight loop over plain tuples keeps
``fleet status`` under a second at 100k devices.

A device's state *speaks of* a release when the release is the version it runs,
the one it has pending, or one it refused. Per release each device counts once,
in the first class that fits: **stale** (its report is older than the bound, or
says it is stale — counted, never in a rate), **failed** (it refused the release,
or its last action failed with the release pending; grouped by the first clause
of the reason, so "health check failed: 512 ms" and "health check failed: 480 ms"
are one reason), **running**, **installing** (pending, not failed).
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
import statistics
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

from edgepack.fleet.store import FleetStore, ModelState, ReleaseHealth

_CLAUSE_END = re.compile(r"[:;,(\n]| - | — ")
REASON_LIMIT = 80
"""A reason's first clause is cut to this many characters."""


@lru_cache(maxsize=4096)
def reason_key(text: str | None) -> str:
    """The first clause of a failure reason, so that similar reasons group."""
    if not text or not text.strip():
        return "failed"
    head = _CLAUSE_END.split(text.strip(), maxsplit=1)[0].strip() or text.strip()
    return head[:REASON_LIMIT]


@dataclass
class _Tally:
    running: int = 0
    installing: int = 0
    stale: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    devices: list[str] = field(default_factory=list)


@dataclass
class _Watch:
    """One release's monitoring figures from fresh devices running it."""

    drift: list[float] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)
    alerting: int = 0
    alerts: Counter[str] = field(default_factory=Counter)
    canary: list[tuple[float, float]] = field(default_factory=list)
    previous: Counter[str] = field(default_factory=Counter)

    def add(self, monitoring: dict[str, Any]) -> None:
        """Fold one device's monitoring entry in (its canary pair when both have rows)."""
        self.drift.append(float(monitoring["drift_psi"]))
        confidence = monitoring.get("mean_confidence")
        if confidence is not None:
            self.confidence.append(float(confidence))
        if monitoring["alerts"]:
            self.alerting += 1
            self.alerts.update(monitoring["alerts"])
        before = monitoring.get("previous")
        if (
            before is not None
            and confidence is not None
            and before.get("mean_confidence") is not None
            and monitoring["rows"] > 0
            and before["rows"] > 0
        ):
            self.canary.append((float(confidence), float(before["mean_confidence"])))
            self.previous[str(before["revision"])] += 1

    def health(self) -> MonitoringHealth:
        """The figures, summed up."""
        n = len(self.canary)
        new = statistics.fmean(c for c, _ in self.canary) if n else None
        old = statistics.fmean(p for _, p in self.canary) if n else None
        return MonitoringHealth(
            reporting=len(self.drift),
            alerting=self.alerting,
            alerts=dict(sorted(self.alerts.items())),
            median_drift_psi=statistics.median(self.drift) if self.drift else None,
            mean_confidence=statistics.fmean(self.confidence) if self.confidence else None,
            canary_devices=n,
            canary_confidence=new,
            previous_confidence=old,
            confidence_change=None if new is None or old is None else new - old,
            previous_revisions=dict(sorted(self.previous.items())),
        )


@dataclass(frozen=True)
class MonitoringHealth:
    """How a release's monitoring reads on fresh devices that run it.

    ``reporting``: devices with a monitoring entry of the revision they run;
    ``alerting``: those with at least one alert. The canary comparison is over the
    ``canary_devices`` whose entry carries the previous revision's figures (both
    windows scored, both with a mean confidence): the mean confidence of this release
    and of the previous revision on the same devices, and the change (new − previous;
    negative is a drop).
    """

    reporting: int
    alerting: int
    alerts: dict[str, int]
    median_drift_psi: float | None
    mean_confidence: float | None
    canary_devices: int
    canary_confidence: float | None
    previous_confidence: float | None
    confidence_change: float | None
    previous_revisions: dict[str, int]

    @property
    def alerting_rate(self) -> float | None:
        """The share of reporting devices with an alert, None when none reports."""
        return None if self.reporting == 0 else self.alerting / self.reporting


def current_monitoring(text: str | None, revision: str | None) -> dict[str, Any] | None:
    """A stored monitoring entry, when it is about the revision the device runs (figures
    of another revision, e.g. scored just before an update, are not this release's)."""
    if text is None:
        return None
    monitoring: dict[str, Any] = json.loads(text)
    if revision is not None and monitoring.get("revision") != revision:
        return None
    return monitoring


def is_stale(state: ModelState, *, now: float, stale_after_s: float) -> bool:
    """Whether a state is too old to count (or the device said it was stale)."""
    return state.stale or now - state.reported_at > stale_after_s


def _count(
    tallies: dict[tuple[str, str, str], _Tally],
    device_id: str,
    model: str,
    channel: str,
    version: str | None,
    pending: str | None,
    refused: dict[str, str],
    last_action: str | None,
    last_error: str | None,
    stale: bool,
) -> None:
    """Count one device's state of one model in every release it speaks of."""
    if not refused and pending is None:
        # The common case: a device that runs one version and wants nothing else.
        if version is None:
            return
        key = (model, channel, version)
        t = tallies.get(key)
        if t is None:
            t = tallies[key] = _Tally()
        t.devices.append(device_id)
        if stale:
            t.stale += 1
        else:
            t.running += 1
        return
    for v in dict.fromkeys(x for x in (version, pending, *refused) if x is not None):
        key = (model, channel, v)
        t = tallies.get(key)
        if t is None:
            t = tallies[key] = _Tally()
        t.devices.append(device_id)
        if stale:
            t.stale += 1
        elif v in refused:
            t.failed[reason_key(refused[v])] += 1
        elif last_action == "failed" and pending == v:
            t.failed[reason_key(last_error)] += 1
        elif v == version:
            t.running += 1
        else:
            t.installing += 1


def _health(model: str, channel: str, version: str, t: _Tally | None) -> ReleaseHealth:
    t = t or _Tally()
    return ReleaseHealth(
        model=model,
        channel=channel,
        version=version,
        running=t.running,
        failed=dict(sorted(t.failed.items())),
        installing=t.installing,
        stale=t.stale,
    )


@contextlib.contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Hold off the cyclic garbage collector while building a large result.

    The status of 100k devices allocates a few hundred thousand dicts and tuples,
    none in a cycle; each allocation burst would otherwise run full collections over
    them (a third of the time). Restored on the way out, whatever happens.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def release_monitoring(
    store: FleetStore, model: str, channel: str, version: str, *, now: float, stale_after_s: float
) -> MonitoringHealth:
    """The monitoring figures of ``version`` of ``model`` on ``channel`` from fresh devices
    that run it (what ``fleet watch``'s confidence and drift policies read)."""
    oldest = now - stale_after_s
    watch = _Watch()
    for row in store.status_rows(model, channel):
        if row[5] is None or row[7] != version or bool(row[13]) or row[14] < oldest:
            continue
        monitoring = current_monitoring(row[16], row[15])
        if monitoring is not None:
            watch.add(monitoring)
    return watch.health()


def release_health(
    store: FleetStore, model: str, channel: str, version: str, *, now: float, stale_after_s: float
) -> ReleaseHealth:
    """How ``version`` of ``model`` on ``channel`` fares (see the module's rules)."""
    oldest = now - stale_after_s
    tallies: dict[tuple[str, str, str], _Tally] = {}
    loads = json.loads
    with _no_cycle_collection():
        # status_rows, not states(): plain tuples, no dataclass per row (twice as fast).
        for row in store.status_rows(model, channel):
            if row[5] is None:
                continue  # a device that has not reported this model
            refused = {} if row[12] == "{}" else loads(row[12])
            stale = bool(row[13]) or row[14] < oldest
            _count(
                tallies, row[0], row[5], row[6], row[7], row[8], refused, row[10], row[11], stale
            )
    return _health(model, channel, version, tallies.get((model, channel, version)))


def fleet_status(
    store: FleetStore,
    *,
    model: str | None = None,
    channel: str | None = None,
    now: float,
    stale_after_s: float,
    unseen_since: float | None = None,
) -> dict[str, Any]:
    """The fleet at a glance, JSON-ready: ``releases`` (per model, channel and version:
    running, installing, failed by reason, failure_rate, stale, the devices that speak
    of it), ``devices`` (each one's last report, model by model), ``unseen`` (registered,
    not revoked, never seen or not since ``unseen_since``), ``drifting`` (fresh devices
    whose monitoring of the revision they run raises alerts) and ``decisions``. Each
    release's ``monitoring`` (None when no fresh device reports any): devices reporting
    and alerting, median drift PSI, mean confidence, and the ``canary`` comparison with
    the previous revision on the same devices.

    ``model`` and ``channel`` narrow every part; a device is listed when one of its
    reported states matches, or when it is registered to follow the model (channel)
    and has not reported it.
    """
    with _no_cycle_collection():
        return _fleet_status(store, model, channel, now, stale_after_s, unseen_since)


def _fleet_status(
    store: FleetStore,
    model: str | None,
    channel: str | None,
    now: float,
    stale_after_s: float,
    unseen_since: float | None,
) -> dict[str, Any]:
    oldest = now - stale_after_s
    tallies: dict[tuple[str, str, str], _Tally] = {}
    devices: list[dict[str, Any]] = []
    unseen: list[str] = []
    follows: dict[tuple[str, str], bool] = {}
    models_of: dict[str, Any] = {}
    watches: dict[tuple[str, str, str], _Watch] = {}
    drifting: list[dict[str, Any]] = []
    current = None
    loads = json.loads
    listed = devices.append
    for (
        device_id, registered, device_channel, seen, revoked_at,
        m, c, version, pending, state, action, error, refused_text, stale_flag, reported_at,
        revision, monitoring_text,
    ) in store.status_rows(model, channel):  # fmt: skip
        if device_id != current:
            current = device_id
            if m is None and (model is not None or channel is not None):
                key = (registered, device_channel)
                ok = follows.get(key)
                if ok is None:
                    ok = follows[key] = (model is None or model in loads(registered)) and (
                        channel is None or channel == device_channel
                    )
                if not ok:
                    continue
            revoked = revoked_at is not None
            models_of = {}
            entry = {
                "device_id": device_id,
                "last_seen": seen,
                "stale": seen is not None and seen < oldest,
                "revoked": revoked,
                "models": models_of,
            }
            listed(entry)
            if not revoked and (seen is None or (unseen_since is not None and seen < unseen_since)):
                unseen.append(device_id)
        if m is None:
            continue
        stale = bool(stale_flag) or reported_at < oldest
        if stale:
            entry["stale"] = True
        models_of[m] = {
            "channel": c,
            "version": version,
            "pending": pending,
            "state": state,
            "last_action": action,
            "last_error": error,
        }
        if monitoring_text is not None:
            monitoring = current_monitoring(monitoring_text, revision)
            models_of[m]["monitoring"] = monitoring
            if monitoring is not None and not stale and version is not None:
                w = watches.get((m, c, version))
                if w is None:
                    w = watches[(m, c, version)] = _Watch()
                w.add(monitoring)
                if monitoring["alerts"]:
                    drifting.append(
                        {
                            "device_id": device_id,
                            "model": m,
                            "channel": c,
                            "version": version,
                            "revision": monitoring["revision"],
                            "alerts": monitoring["alerts"],
                            "rows": monitoring["rows"],
                            "drift_psi": monitoring["drift_psi"],
                            "max_feature_psi": monitoring["max_feature_psi"],
                            "anomaly_rate": monitoring["anomaly_rate"],
                            "mean_confidence": monitoring["mean_confidence"],
                        }
                    )
        if refused_text == "{}" and pending is None and version is not None:
            # The common case, inlined (most of 100k rows): one version, nothing else.
            t = tallies.get((m, c, version))
            if t is None:
                t = tallies[(m, c, version)] = _Tally()
            t.devices.append(device_id)
            if stale:
                t.stale += 1
            else:
                t.running += 1
            continue
        refused = {} if refused_text == "{}" else loads(refused_text)
        _count(tallies, device_id, m, c, version, pending, refused, action, error, stale)

    releases = []
    for (rm, rc, rv), t in sorted(tallies.items()):
        health = _health(rm, rc, rv, t)
        releases.append(
            {
                "model": rm,
                "channel": rc,
                "version": rv,
                "running": health.running,
                "installing": health.installing,
                "failed": health.failed,
                "failure_rate": health.rate,
                "stale": health.stale,
                "devices": t.devices,
                "monitoring": _monitoring_view(watches.get((rm, rc, rv))),
            }
        )
    decisions = [
        asdict(d) for d in store.decisions(model) if channel is None or d.channel == channel
    ]
    return {
        "generated_at": now,
        "stale_after_s": stale_after_s,
        "releases": releases,
        "devices": devices,
        "unseen": unseen,
        "drifting": drifting,
        "decisions": decisions,
    }


def _monitoring_view(watch: _Watch | None) -> dict[str, Any] | None:
    """A release's monitoring as JSON (None when no fresh device reports any)."""
    if watch is None:
        return None
    h = watch.health()
    return {
        "reporting": h.reporting,
        "alerting": h.alerting,
        "alerts": h.alerts,
        "median_drift_psi": h.median_drift_psi,
        "mean_confidence": h.mean_confidence,
        "canary": None
        if h.canary_devices == 0
        else {
            "devices": h.canary_devices,
            "confidence": h.canary_confidence,
            "previous_confidence": h.previous_confidence,
            "change": h.confidence_change,
            "previous_revisions": h.previous_revisions,
        },
    }
