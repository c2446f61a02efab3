"""The poll loop: interval with jitter, exponential back-off after a failed or stale poll.

Each poll's outcomes are logged here, one line per model: a move at INFO, a
refusal at WARNING (what a retry may fix: transport, a stale repository, no
release) or ERROR (a refused release, the device's configuration or key). In
the daemon a refusal that repeats the previous poll's word for word drops to
DEBUG, so the journal records changes rather than every poll.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable

from device_agent.agent import Agent
from device_agent.config import Limits
from device_agent.outcome import Outcome
from edgepack.errors import EdgepackError

log = logging.getLogger(__name__)


def next_delay(failures: int, limits: Limits, rng: random.Random) -> float:
    """Seconds until the next poll: the interval, doubled per consecutive failure, jittered.

    Jitter spreads a fleet's polls so a repository is not hit by every device
    at once after an outage.
    """
    base = limits.poll_interval_s * (2 ** min(failures, 20))
    base = min(base, max(limits.backoff_max_s, limits.poll_interval_s))
    spread = max(0.0, min(limits.poll_jitter, 1.0))
    return float(base * rng.uniform(1.0 - spread, 1.0 + spread))


def failed(outcomes: list[Outcome]) -> bool:
    """True when a poll should count toward back-off: the repository was unreadable
    (stale) or an update hit a transport or disk error. A release refused on its
    merits is not a reason to poll less often."""
    return any(o.action == "error" or not o.checked for o in outcomes)


def poll_once(agent: Agent, seen: dict[str, tuple[str, str | None]] | None = None) -> list[Outcome]:
    """Recover what a crash left, then poll, under the data directory's lock (with
    the journal re-read under it: a local verdict may have changed it since).

    The outcomes are logged; ``seen`` (the daemon's memory of the last poll)
    turns a repeated refusal down to DEBUG.
    """
    with agent.exclusive():
        agent.recover()
        outcomes = agent.poll()
    report(outcomes, seen)
    return outcomes


def report(outcomes: list[Outcome], seen: dict[str, tuple[str, str | None]] | None = None) -> None:
    """Log one line per outcome (one for all models when the repository was unreadable)."""
    seen = {} if seen is None else seen
    said: set[str] = set()
    for o in outcomes:
        key = (o.action, o.error)
        repeated = seen.get(o.model) == key
        seen[o.model] = key
        if o.action == "installed":
            log.info("%s: installed %s (was %s)", o.model, o.revision, o.previous or "nothing")
        elif o.action == "rolled-back":
            log.info(
                "%s: rolled back to %s (was %s): the channel names %s again",
                o.model,
                o.revision,
                o.previous or "nothing",
                o.version,
            )
        elif o.action == "up-to-date":
            log.debug("%s", o.describe())
        elif not o.checked:
            if o.error not in said:  # the same reason for every model: said once
                said.add(o.error or "")
                log.log(
                    logging.DEBUG if repeated else logging.WARNING,
                    "%s; the running models keep running",
                    o.error,
                )
        else:
            severe = o.action == "failed" or o.exit_code not in (0, 6, 7)
            level = logging.ERROR if severe else logging.WARNING
            log.log(logging.DEBUG if repeated else level, "%s", o.describe())


def run(
    agent: Agent,
    *,
    stop: threading.Event | None = None,
    seed: int | None = None,
    after_poll: Callable[[], None] | None = None,
) -> None:
    """Poll until ``stop`` is set (a daemon: systemd or snapd restarts it if it dies).

    ``after_poll`` runs after each poll, in this thread (the reporter's hook: it
    queues a report on disk and returns; it must never wait on the network).
    """
    stop = stop or threading.Event()
    rng = random.Random(seed)  # noqa: S311 - jitter, not security
    failures = 0
    seen: dict[str, tuple[str, str | None]] = {}
    cfg = agent.config
    log.info(
        "started: following %s on channel %s from %s, every %g s",
        ", ".join(cfg.models),
        cfg.channel,
        cfg.metadata_url,
        cfg.limits.poll_interval_s,
    )
    while not stop.is_set():
        try:
            outcomes = poll_once(agent, seen)
        except EdgepackError as exc:  # e.g. a local command holds the lock: try again later
            log.warning("poll skipped: %s", exc.diagnostics())
            outcomes = [Outcome(m, "error", error=exc.diagnostics()) for m in agent.config.models]
        if after_poll is not None:
            after_poll()
        failures = failures + 1 if failed(outcomes) else 0
        delay = next_delay(failures, agent.config.limits, rng)
        if failures:  # said at INFO when the back-off starts, then at DEBUG
            level = logging.INFO if failures == 1 else logging.DEBUG
            polls = "1 failed poll" if failures == 1 else f"{failures} failed polls"
            log.log(level, "next poll in %.0f s (back-off after %s)", delay, polls)
        stop.wait(delay)
    log.info("stopped")
