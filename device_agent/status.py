"""The status document: what each model runs, when it was checked, what went wrong.

``edgepack-agent status --json`` prints it and the agent writes it to
``DATA/status.json`` after each poll and each local verdict (revert, confirm,
report-bad), atomically, for other tools to read. :func:`check` judges it for
``edgepack-agent check``, a monitoring timer's question "is this device fine?".
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent import _atomic, monitorstore
from device_agent.config import AgentConfig
from device_agent.slots import Slots
from device_agent.state import Journal
from edgepack._version import __version__

STATUS_NAME = "status.json"


def load(data_dir: Path) -> dict[str, Any]:
    """The last written status document (empty when none)."""
    raw = _atomic.read_json(data_dir / STATUS_NAME)
    return raw if isinstance(raw, dict) else {}


def build(
    config: AgentConfig,
    journal: Journal,
    poll: dict[str, dict[str, Any]],
    *,
    stale: bool,
    previous: dict[str, Any] | None = None,
    polled: bool | None = None,
) -> dict[str, Any]:
    """Assemble the status of every followed model from the journal and the last poll.

    ``polled`` says whether this document follows a poll (``last_poll`` is now);
    by default, when there are poll results or the poll found the repository stale.
    """
    previous = previous or {}
    old_models = previous.get("models", {})
    models: dict[str, Any] = {}
    for name in config.models:
        mj = journal.model(name)
        slots = Slots(config.data_dir, name)
        running = slots.current()
        rev = mj.revisions.get(running) if running else None
        entry = dict(old_models.get(name, {}))
        entry.update(
            {
                "revision": running,
                "version": rev.version if rev else None,
                "state": mj.state.value,
                "installed": sorted(slots.installed()),
                "failed_releases": dict(mj.failed),
                "failed_bundles": dict(mj.failed_bundles),
                "awaiting_confirmation": mj.confirm is not None,
                "confirm_deadline": float(mj.confirm["deadline"]) if mj.confirm else None,
                "repairs": list(mj.repairs),
                "pending": (
                    mj.update.version
                    if mj.update and mj.state.value not in ("idle", "committed")
                    else None
                ),
            }
        )
        fresh = poll.get(name, {})
        latencies = _latencies(entry) | _latencies(fresh)
        entry.update(fresh)
        # Each installed revision's health-check latency, measured when it was installed.
        entry["health_latency_ms"] = {r: v for r, v in latencies.items() if r in entry["installed"]}
        entry["monitoring"] = monitoring(config, journal, name, running)
        models[name] = entry
    return {
        "format": 1,
        "agent_version": __version__,
        "device_id": config.device_id,
        "channel": config.channel,
        "stale": stale,
        "last_poll": time.time()
        if (polled if polled is not None else bool(poll or stale))
        else previous.get("last_poll"),
        "models": models,
    }


def monitoring(
    config: AgentConfig, journal: Journal, name: str, running: str | None
) -> dict[str, Any] | None:
    """The running revision's monitoring figures with the previous revision's beside them
    (``previous``), read from ``DATA/monitor``; None when the running revision has no
    monitoring state yet.

    ``canary`` compares the running revision's outputs with the previous revision's
    reference (:func:`device_agent.monitorstore.canary`); its alerts join ``alerts``,
    so a revision that predicts unlike the one before it makes ``check`` exit 8.
    """
    if not running:
        return None
    current = monitorstore.summary(config.data_dir, name, running)
    if current is None:
        return None
    mj = journal.model(name)
    before = mj.update.previous if mj.update and mj.update.revision == running else None
    current["previous"] = current["canary"] = None
    if before and before != running:
        current["previous"] = monitorstore.summary(config.data_dir, name, before)
        comparison = monitorstore.canary(
            config.data_dir, name, running, before, config.monitor_overrides()
        )
        if comparison is not None:
            current["canary"] = comparison
            current["alerts"] = [*current["alerts"], *comparison["alerts"]]
    return current


def refresh_monitoring(config: AgentConfig, document: dict[str, Any]) -> dict[str, Any]:
    """``document`` with each model's monitoring read again from disk (the application
    writes it between polls); cheap: a few small JSON files, no lock."""
    journal = Journal.load(config.data_dir)
    for name, entry in document.get("models", {}).items():
        if name in config.models and isinstance(entry, dict):
            running = Slots(config.data_dir, name).current()
            entry["monitoring"] = monitoring(config, journal, name, running)
    return document


def _latencies(entry: dict[str, Any]) -> dict[str, float]:
    """The ``health_latency_ms`` map of a status entry (revision -> ms), what is valid of it."""
    raw = entry.get("health_latency_ms")
    if not isinstance(raw, dict):
        return {}
    return {
        str(r): float(v)
        for r, v in raw.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def write(data_dir: Path, document: dict[str, Any]) -> None:
    """Write ``DATA/status.json`` atomically."""
    _atomic.write_json(data_dir / STATUS_NAME, document)


def update(
    config: AgentConfig,
    journal: Journal,
    poll: dict[str, dict[str, Any]] | None = None,
    stale: bool | None = None,
) -> None:
    """Rewrite ``DATA/status.json`` from the journal: after a poll with its results and
    staleness, or (``poll`` None) after a local verdict, keeping the last poll's facts.

    Best effort: the status file is a report, and a full disk must not undo a verdict.
    """
    previous = load(config.data_dir)
    if poll is None:
        doc = build(
            config, journal, {}, stale=bool(previous.get("stale")), previous=previous, polled=False
        )
    else:
        doc = build(config, journal, poll, stale=bool(stale), previous=previous)
    with contextlib.suppress(OSError):
        write(config.data_dir, doc)


# Exit codes of `edgepack-agent check`, most severe first (docs/agent.md, "Exit codes").
NO_REVISION, INSTALL_FAILED, CONFIRM_OVERDUE, STALE, MONITOR_ALERT = 3, 4, 6, 7, 8


@dataclass(frozen=True)
class Problem:
    """One reason a device is not healthy, with the exit code it stands for."""

    model: str
    code: int
    what: str


def check(
    config: AgentConfig, document: dict[str, Any], *, max_stale_s: float, now: float
) -> list[Problem]:
    """What is wrong with the device by its status document, most severe first.

    A model is unhealthy when it runs nothing (3), its last install was refused (4),
    its confirmation window has passed with no verdict and no rollback (6: the
    agent is not polling), or its last successful check is older than
    ``max_stale_s`` or missing (7), or the last scored monitoring window of its running
    revision crossed a threshold (8: the model runs, the data it sees has moved). A
    stale poll within the bound is not a problem: the loop backs off and retries.
    """
    problems: list[Problem] = []
    models = document.get("models", {})
    for name in config.models:
        m = models.get(name, {})
        error = f": {m['last_error']}" if m.get("last_error") else ""
        if not m.get("revision"):
            problems.append(Problem(name, NO_REVISION, f"no model running{error}"))
        if m.get("last_action") == "failed":
            problems.append(Problem(name, INSTALL_FAILED, f"the last install failed{error}"))
        deadline = m.get("confirm_deadline")
        if m.get("awaiting_confirmation") and isinstance(deadline, int | float) and now > deadline:
            problems.append(
                Problem(
                    name,
                    CONFIRM_OVERDUE,
                    f"{m.get('revision')} awaits confirmation {now - deadline:.0f} s past its "
                    "window and was not rolled back (is the agent polling?)",
                )
            )
        last = m.get("last_check")
        if not isinstance(last, int | float):
            problems.append(Problem(name, STALE, "never checked against the repository"))
        elif now - last > max_stale_s:
            problems.append(
                Problem(
                    name,
                    STALE,
                    f"last checked {now - last:.0f} s ago (bound {max_stale_s:g} s){error}",
                )
            )
        watch = m.get("monitoring")
        alerts = watch.get("alerts") if isinstance(watch, dict) else None
        if alerts and watch.get("revision") == m.get("revision"):
            said = ", ".join(
                f"{a.get('kind')} {a.get('value')} (threshold {a.get('threshold')})"
                + (f": {a['detail']}" if a.get("detail") else "")
                for a in alerts
                if isinstance(a, dict)
            )
            problems.append(
                Problem(name, MONITOR_ALERT, f"{m.get('revision')}: monitoring alert: {said}")
            )
    return sorted(problems, key=lambda p: (_SEVERITY.index(p.code), p.model))


_SEVERITY = (NO_REVISION, INSTALL_FAILED, CONFIRM_OVERDUE, STALE, MONITOR_ALERT)
