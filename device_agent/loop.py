"""The poll loop: interval with jitter, exponential back-off after a failed or stale poll."""

from __future__ import annotations

import random
import threading

from device_agent.agent import Agent
from device_agent.config import Limits
from device_agent.outcome import Outcome
from edgepack.errors import EdgepackError


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


def poll_once(agent: Agent) -> list[Outcome]:
    """Recover what a crash left, then poll, under the data directory's lock (with
    the journal re-read under it: a local verdict may have changed it since)."""
    with agent.exclusive():
        agent.recover()
        return agent.poll()


def run(agent: Agent, *, stop: threading.Event | None = None, seed: int | None = None) -> None:
    """Poll until ``stop`` is set (a daemon: systemd or snapd restarts it if it dies)."""
    stop = stop or threading.Event()
    rng = random.Random(seed)  # noqa: S311 - jitter, not security
    failures = 0
    while not stop.is_set():
        try:
            outcomes = poll_once(agent)
        except EdgepackError as exc:  # e.g. a local command holds the lock: try again later
            outcomes = [Outcome(m, "error", error=exc.diagnostics()) for m in agent.config.models]
        failures = failures + 1 if failed(outcomes) else 0
        stop.wait(next_delay(failures, agent.config.limits, rng))
