"""Rollouts that watch themselves: halt, roll back or widen from what the fleet reports.

For every rollout the operators recorded (``promote … --halt-on-failure``, kept in
``WORKDIR/rollouts.json`` by :mod:`edgepack.repo._rollouts`), :func:`watch_once`
reads the release's health from the fleet store (fresh reports only: a stale
device is counted apart and never in the rate) and decides:

* the failure rate reached the threshold among at least ``min_devices`` fresh
  devices — or, with a monitoring policy, the release's mean confidence dropped by
  more than ``halt_on_confidence_drop`` against the previous revision on the same
  devices (at least ``min_devices`` fresh ones carrying that canary comparison), or
  ``halt_on_drift_alerts`` of the fresh devices reporting monitoring raise alerts —
  → the policy's ``on_failure``: **halt** (stop widening; the signed
  channel document stays as it is, its percentage already frozen since buckets
  are deterministic) or **rollback** (the forward-move rollback, signed with the
  operators' key the watcher was given; without a key the decision is recorded
  as needing an operator and nothing is published);
* else, healthy among at least ``min_devices`` fresh devices for ``widen_after``
  at this step → **widen** to the next step (the same release promoted again, signed).

Every decision is first claimed in the store (unique on model, channel, version,
action and step), so of two watchers running at once one decides; the change is
then made under the repository's publish lock after checking, again, that the
record and the channel document are still what the decision was made on, so it
is made once. A watcher that lost the claim runs the same idempotent step: it
finishes the work of a winner that died between claiming and publishing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgepack import channel as ch
from edgepack.errors import ConflictError, KeyFileError
from edgepack.fleet.store import Decision, FleetStore, ReleaseHealth
from edgepack.fleet.summary import MonitoringHealth, release_health, release_monitoring
from edgepack.repo import _channels, _rollouts
from edgepack.repo._keys import PassphraseSource, no_passphrase
from edgepack.repo._ops import change_channels, open_store
from edgepack.repo._settings import RepoPaths
from edgepack.repo._store import publish_lock

log = logging.getLogger("edgepack.fleet.watch")

HALT = "halt"
ROLLBACK = "rollback"
WIDEN = "widen"
DEFAULT_STALE_AFTER_S = 3600.0


@dataclass(frozen=True)
class Outcome:
    """What carrying out a decision did: published a channel document, or only moved the record."""

    done: bool
    sequence: int | None = None
    note: str = ""


def watch_once(
    store: FleetStore,
    workdir: Path,
    *,
    key: str | None = None,
    passphrase: PassphraseSource = no_passphrase,
    now: float | None = None,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
) -> list[Decision]:
    """One pass over the watched rollouts of ``workdir``; the decisions this watcher won.

    ``key`` (PEM path or signer URI of the operators' key) is needed only to
    publish a rollback or a widening; without it a rollback is recorded as
    needing an operator and a due widening waits.
    """
    at = time.time() if now is None else now
    won: list[Decision] = []
    for record in _rollouts.load(workdir).values():
        if record.state != _rollouts.WATCHING:
            continue
        try:
            decision = _decide(
                store, workdir, record, has_key=key is not None, now=at, stale=stale_after_s
            )
        except ConflictError as exc:  # the lock, to mark a record superseded: next pass
            log.warning("%s/%s: %s; will retry", record.model, record.channel, exc.message)
            continue
        if decision is None:
            continue
        if store.claim(decision):
            log.info(
                "%s/%s %s: %s at %g%%: %s",
                decision.model,
                decision.channel,
                decision.version,
                decision.action,
                decision.step,
                decision.reason,
            )
            won.append(decision)
        else:
            log.info(
                "%s/%s %s: %s at %g%% was already decided by another watcher",
                decision.model,
                decision.channel,
                decision.version,
                decision.action,
                decision.step,
            )
            if decision.details.get("needs_operator"):
                continue  # the winner may hold the key this watcher lacks: leave it the work
        try:
            outcome = carry_out(workdir, record, decision, key=key, passphrase=passphrase, now=at)
        except ConflictError as exc:
            # Another publisher holds the lock; the next pass (ours or another
            # watcher's) finishes the decision, which stays claimed.
            log.warning("%s/%s: %s; will retry", record.model, record.channel, exc.message)
            continue
        if outcome.note:
            log.info("%s/%s %s: %s", record.model, record.channel, record.version, outcome.note)
    return won


def _decide(
    store: FleetStore,
    workdir: Path,
    record: _rollouts.Rollout,
    *,
    has_key: bool,
    now: float,
    stale: float,
) -> Decision | None:
    doc = _document(workdir, record, now)
    if not _still_current(doc, record):
        _move(workdir, record, record.moved(_rollouts.SUPERSEDED, _superseded(doc), now))
        log.info("%s/%s %s: %s", record.model, record.channel, record.version, _superseded(doc))
        return None
    policy = record.policy
    health = release_health(
        store, record.model, record.channel, record.version, now=now, stale_after_s=stale
    )
    fresh = health.failures + health.running
    rate = health.rate
    details: dict[str, Any] = {
        "running": health.running,
        "failed": dict(health.failed),
        "installing": health.installing,
        "stale": health.stale,
        "rate": rate,
        "threshold": policy.halt_on_failure,
        "min_devices": policy.min_devices,
    }
    enough = fresh >= policy.min_devices
    regressed = None
    if policy.halt_on_confidence_drop is not None or policy.halt_on_drift_alerts is not None:
        monitoring = release_monitoring(
            store, record.model, record.channel, record.version, now=now, stale_after_s=stale
        )
        details["monitoring"] = {
            "reporting": monitoring.reporting,
            "alerting": monitoring.alerting,
            "canary_devices": monitoring.canary_devices,
            "confidence": monitoring.canary_confidence,
            "previous_confidence": monitoring.previous_confidence,
            "change": monitoring.confidence_change,
        }
        regressed = _monitoring_reason(monitoring, policy)
    failing = (
        enough
        and rate is not None
        and policy.halt_on_failure is not None
        and rate >= policy.halt_on_failure
    )
    if failing or regressed is not None:
        action = policy.on_failure
        reason = _failure_reason(health, policy) if failing else str(regressed)
        if action == ROLLBACK:
            earlier = [r for r in doc.previous if r.version not in doc.revoked]
            if not earlier:
                action = HALT
                reason += "; no earlier release to roll back to, halted instead"
            elif not has_key:
                details["needs_operator"] = True
                reason += (
                    f"; rolling back to {earlier[0].version} needs an operator "
                    "(the watcher has no operators' key)"
                )
            else:
                details["to_version"] = earlier[0].version
        return Decision(
            record.model, record.channel, record.version, action, record.step, reason, now, details
        )
    step = policy.next_step(record.step)
    healthy_for = now - record.since
    if step is None or healthy_for < policy.widen_after_s or not enough:
        return None
    if not has_key:
        log.info(
            "%s/%s %s: widening to %g%% is due but needs the operators' key (--key)",
            record.model,
            record.channel,
            record.version,
            step,
        )
        return None
    reason = (
        f"healthy for {_duration(healthy_for)} at {record.step:g}%: "
        f"{health.failures} of {fresh} fresh devices failed"
        f"{'' if rate is None else f' ({rate:.1%})'}"
        f"{'' if policy.halt_on_failure is None else f', under {policy.halt_on_failure:.1%}'}"
        f"; {health.stale} stale not counted"
    )
    details["from_step"] = record.step
    return Decision(record.model, record.channel, record.version, WIDEN, step, reason, now, details)


def carry_out(
    workdir: Path,
    record: _rollouts.Rollout,
    decision: Decision,
    *,
    key: str | None,
    passphrase: PassphraseSource,
    now: float,
) -> Outcome:
    """Make ``decision`` take effect, once: under the publish lock, and only if the record
    is still ``record`` (else another watcher already did it)."""
    if decision.action == HALT or decision.details.get("needs_operator"):
        done = _move(workdir, record, record.moved(_rollouts.HALTED, decision.reason, now))
        note = "halted" if decision.action == HALT else "halted; the rollback needs an operator"
        return Outcome(done, None, note if done else "")
    if key is None:
        raise KeyFileError(
            f"publishing a {decision.action} needs the operators' key",
            hint="give `edgepack fleet watch` --key OPERATORS.key",
        )
    moved: list[_rollouts.Rollout] = []

    def build(store: Any) -> list[ch.ChannelDocument]:
        if _rollouts.load(workdir).get(record.key) != record:
            return []
        doc = _channels.load_document(store, record.model, record.channel)
        if not _still_current(doc, record):
            return []
        assert doc.current is not None
        if decision.action == ROLLBACK:
            new = ch.rollback(doc)
            assert new.current is not None
            note = f"rolled back to {new.current.version} (channel sequence {new.sequence})"
            moved.append(record.moved(_rollouts.ROLLED_BACK, f"{decision.reason}; {note}", now))
            return [new]
        new = _channels.promote(
            store,
            record.model,
            record.version,
            record.channel,
            rollout=decision.step,
            cohorts=doc.current.cohorts,
        )
        state = _rollouts.COMPLETE if decision.step >= 100 else _rollouts.WATCHING
        note = f"widened to {decision.step:g}% (channel sequence {new.sequence})"
        moved.append(record.moved(state, f"{decision.reason}; {note}", now, step=decision.step))
        return [new]

    def after(docs: list[ch.ChannelDocument]) -> None:
        if docs and moved:
            rollouts = _rollouts.load(workdir)
            rollouts[record.key] = moved[0]
            _rollouts.save(workdir, rollouts)

    result = change_channels(
        workdir,
        build,
        passphrase=passphrase,
        key=key,
        now=datetime.fromtimestamp(now, timezone.utc),
        after=after,
    )
    docs = result.summary.get("documents", [])
    if not docs:
        return Outcome(False)
    return Outcome(True, int(docs[0]["sequence"]), moved[0].reason.rpartition("; ")[2])


def watch_forever(
    open_fleet: Callable[[], FleetStore],
    workdir: Path,
    *,
    interval_s: float,
    stop: threading.Event,
    key: str | None = None,
    passphrase: PassphraseSource = no_passphrase,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
    on_decision: Callable[[Decision], None] | None = None,
) -> None:
    """Run :func:`watch_once` every ``interval_s`` until ``stop`` is set.

    A pass that fails (the database down, the lock held, a key that will not
    open) is logged and tried again at the next interval: the watcher outlives
    a restarting database.
    """
    from edgepack.errors import EdgepackError

    fleet: FleetStore | None = None
    while not stop.is_set():
        try:
            if fleet is None:
                fleet = open_fleet()
            for decision in watch_once(
                fleet, workdir, key=key, passphrase=passphrase, stale_after_s=stale_after_s
            ):
                if on_decision is not None:
                    on_decision(decision)
        except EdgepackError as exc:
            log.error(
                "watch pass failed: %s; retrying in %s", exc.diagnostics(), _duration(interval_s)
            )
            if fleet is not None:
                fleet.close()
                fleet = None
        stop.wait(interval_s)
    if fleet is not None:
        fleet.close()


def _document(workdir: Path, record: _rollouts.Rollout, now: float) -> ch.ChannelDocument:
    _paths, _settings, store = open_store(
        workdir, no_passphrase, datetime.fromtimestamp(now, timezone.utc)
    )
    return _channels.load_document(store, record.model, record.channel)


def _still_current(doc: ch.ChannelDocument, record: _rollouts.Rollout) -> bool:
    """Whether the channel still runs the watched release at the watched step."""
    cur = doc.current
    return (
        cur is not None
        and cur.version == record.version
        and cur.version not in doc.revoked
        and cur.rollout == record.step
    )


def _superseded(doc: ch.ChannelDocument) -> str:
    cur = doc.current
    now = "nothing" if cur is None else f"{cur.version} at {cur.rollout:g}%"
    return f"the channel changed outside the watcher (now {now}, sequence {doc.sequence}); stopped watching"


def _move(workdir: Path, old: _rollouts.Rollout, new: _rollouts.Rollout) -> bool:
    """Replace record ``old`` by ``new`` under the publish lock, if it is still ``old``."""
    with publish_lock(RepoPaths(workdir)):
        rollouts = _rollouts.load(workdir)
        if rollouts.get(old.key) != old:
            return False
        rollouts[old.key] = new
        _rollouts.save(workdir, rollouts)
    return True


def _failure_reason(health: ReleaseHealth, policy: _rollouts.Policy) -> str:
    fresh = health.failures + health.running
    why = ", ".join(f"{n} {reason}" for reason, n in sorted(health.failed.items()))
    rate = health.rate or 0.0
    return (
        f"{health.failures} of {fresh} fresh devices failed ({rate:.1%}; {why}), "
        f"at or over {policy.halt_on_failure:.1%} with at least {policy.min_devices}; "
        f"{health.stale} stale not counted"
    )


def _monitoring_reason(health: MonitoringHealth, policy: _rollouts.Policy) -> str | None:
    """What regressed in the release's monitoring, per the policy; None when nothing did.

    Both checks need at least ``min_devices`` fresh devices with the figures they read:
    the canary comparison (this release's mean confidence against the previous
    revision's on the same devices) or a monitoring entry at all.
    """
    drop = policy.halt_on_confidence_drop
    change = health.confidence_change
    if (
        drop is not None
        and change is not None
        and health.canary_devices >= policy.min_devices
        and -change > drop
    ):
        previous = ", ".join(health.previous_revisions)
        return (
            f"mean confidence dropped by {-change:.3f} ({health.canary_confidence:.3f} against "
            f"{health.previous_confidence:.3f} for the previous revision {previous} on the same "
            f"{health.canary_devices} fresh devices), more than --halt-on-confidence-drop "
            f"{drop:g} with at least {policy.min_devices}"
        )
    share = policy.halt_on_drift_alerts
    rate = health.alerting_rate
    if (
        share is not None
        and rate is not None
        and health.reporting >= policy.min_devices
        and rate >= share
    ):
        kinds = ", ".join(f"{n} {kind}" for kind, n in health.alerts.items())
        return (
            f"{health.alerting} of {health.reporting} fresh devices raise monitoring alerts "
            f"({rate:.1%}; {kinds}), at or over --halt-on-drift-alerts {share:.1%} "
            f"with at least {policy.min_devices}"
        )
    return None


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.3g}{unit}"
    return f"{seconds:.3g}s"
