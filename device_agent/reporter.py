"""The sender of the device's reports: a background thread that empties the on-disk queue.

The poll thread only queues a report (:meth:`Reporter.after_poll`, local and
quick) and wakes this thread; the update loop never waits on the fleet service.
Queued reports go oldest first as ``POST {fleet_url}/v1/reports`` with the
``Edgepack-Signature`` header, through a connection pool made as the
repository fetcher's (``ca_file``, ``proxy``, ``no_proxy``) and bounded by
``report_timeout_s`` for the whole exchange. What the answer means:

* 202: taken; the report is deleted.
* 400, 409, 413, 422: the service will never take this report (malformed,
  replayed, too large, names a model not followed); deleted, logged as an error
  with the service's message.
* anything else — 401/403 (not registered yet, or revoked), 5xx, no
  connection, a timeout: kept; the thread backs off (doubling, capped at
  ``backoff_max_s``) and tries again, the queue bounded at ``report_queue_max``.

This module imports urllib3 (through the fetcher); the daemon imports it only
when ``fleet_url`` is set.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import urllib3

from device_agent import fetcher as fetcher_mod
from device_agent import report as report_mod
from device_agent import status as status_mod
from device_agent.config import AgentConfig
from device_agent.errors import ConfigError
from device_agent.fetcher import AgentFetcher
from edgepack import fleetreport
from edgepack.errors import InvalidInputError

log = logging.getLogger(__name__)

REPORTS_PATH = "/v1/reports"
TAKEN = 202
NEVER_TAKEN = frozenset({400, 409, 413, 422})
FIRST_BACKOFF_S = 5.0
MAX_ANSWER_BYTES = 4096


@dataclass
class Result:
    """What one pass over the queue did."""

    sent: int = 0
    dropped: int = 0
    kept: int = 0
    errors: list[str] = field(default_factory=list)  # why reports were dropped or kept


def _message(status: int, data: bytes) -> str:
    """The service's word on a refusal: its JSON ``message`` (or ``detail``/``error``), or
    its text, cut to one short line."""
    text = data.decode("utf-8", "replace").strip()
    with contextlib.suppress(ValueError):
        doc = json.loads(text)
        if isinstance(doc, dict):
            for key in ("message", "detail", "error"):
                if isinstance(doc.get(key), str) and doc[key]:
                    text = doc[key]
                    break
    said = fleetreport.cut(" ".join(text.split()), 200)
    return f"HTTP {status}: {said}" if said else f"HTTP {status}"


class Reporter:
    """Queue reports of this device and send them to its fleet service."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        profile: str,
        architecture: str,
        seed: int | None = None,
    ) -> None:
        if not config.fleet_url:
            raise report_mod.NoFleetError(
                "this device reports to no fleet service (no fleet_url in config.toml)",
                hint="enrol again with --fleet-url URL",
            )
        self.config = config
        self.limits = config.limits
        try:
            self.url = report_mod.check_fleet_url(config.fleet_url) + REPORTS_PATH
        except InvalidInputError as exc:
            raise ConfigError(
                f"{config.config_path}: {exc.message}", hint="enrol again with a valid --fleet-url"
            ) from None
        self.profile = profile
        self.architecture = architecture
        self.queue = report_mod.Queue(config)
        # The fetcher's pools: the same CA bundle, proxy and no_proxy as the repository's.
        self._transport = AgentFetcher(config.limits, ca_file=config.ca_file, proxy=config.proxy)
        self.wake = threading.Event()
        self._lock = threading.Lock()
        self._last: dict[str, Any] | None = None
        self._last_queued = time.monotonic()
        self._rng = random.Random(seed)  # noqa: S311 - jitter, not security
        self.failures = 0

    # -- queueing (the poll thread) -------------------------------------------
    def queue_if_due(self, *, force: bool = False) -> bool:
        """Queue a report when its content changed since the last one, when the heartbeat
        (``report_interval_s``) is due, or when ``force``d; wake the sender."""
        status = status_mod.load(self.config.data_dir)
        doc = report_mod.content(
            self.config, status, profile=self.profile, architecture=self.architecture
        )
        with self._lock:
            now = time.monotonic()
            due = now >= self._heartbeat_at()
            if not (force or due or doc != self._last):
                return False
            self.queue.put(doc)
            self._last, self._last_queued = doc, now
        self.wake.set()
        return True

    def _heartbeat_at(self) -> float:
        """When the next heartbeat is due (never with ``report_interval_s`` 0)."""
        interval = self.limits.report_interval_s
        return self._last_queued + interval if interval > 0 else math.inf

    def after_poll(self) -> None:
        """The poll thread's hook: queue a report if one is due; never raises, never waits
        on the network (a full disk costs a report, not a poll)."""
        try:
            self.queue_if_due()
        except Exception as exc:  # the update loop must go on whatever reporting meets
            log.warning("could not queue a report: %s", exc)

    # -- sending ----------------------------------------------------------------
    def _post(self, queued: report_mod.Queued) -> tuple[int | None, str]:
        """Send one report; (HTTP status or None for no answer, what happened)."""
        t = self.limits.report_timeout_s
        timeout = urllib3.Timeout(
            connect=min(self.limits.connect_timeout_s, t) or None, read=t or None
        )
        headers = {
            "User-Agent": fetcher_mod.USER_AGENT,
            "Content-Type": "application/json",
            fleetreport.SIGNATURE_HEADER: queued.signature,
        }
        with fetcher_mod._Deadline(t) as deadline:
            try:
                resp = self._transport._manager(self.url).urlopen(
                    "POST",
                    self.url,
                    body=queued.body,
                    headers=headers,
                    redirect=False,
                    retries=False,
                    preload_content=False,
                    timeout=timeout,
                )
                try:
                    answer = resp.read(MAX_ANSWER_BYTES)
                finally:
                    resp.release_conn()
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                if deadline.expired.is_set():
                    return None, f"{self.url}: no answer within {t:g} s"
                return None, f"cannot reach {self.url}: {fetcher_mod._reason(exc)}"
        if deadline.expired.is_set():
            return None, f"{self.url}: no answer within {t:g} s"
        return resp.status, _message(resp.status, answer)

    def send_once(self) -> Result:
        """Send the queue oldest first, until it is empty or the service stops taking."""
        result = Result()
        pending = self.queue.pending()
        for index, queued in enumerate(pending):
            status, said = self._post(queued)
            if status == TAKEN or status in NEVER_TAKEN:
                with contextlib.suppress(FileNotFoundError):
                    queued.path.unlink()
            if status == TAKEN:
                result.sent += 1
                self.queue.sent()
                continue
            if status in NEVER_TAKEN:
                result.dropped += 1
                result.errors.append(said)
                log.error(
                    "the fleet service refused report %d for good (%s); dropped",
                    queued.counter,
                    said,
                )
                continue
            result.kept = len(pending) - index
            if status in (401, 403):
                said += " (is this device registered with the fleet, and not revoked?)"
            result.errors.append(said)
            break
        return result

    def _backoff(self) -> float:
        base = FIRST_BACKOFF_S * 2 ** min(self.failures - 1, 20)
        base = min(base, max(self.limits.backoff_max_s, 0.1))
        spread = max(0.0, min(self.limits.poll_jitter, 1.0))
        return float(base * self._rng.uniform(1.0 - spread, 1.0 + spread))

    def run(self, stop: threading.Event) -> None:
        """Send until ``stop`` is set: on every wake, after a back-off, and queue the
        heartbeat when no report went out for ``report_interval_s``."""
        retry_at = 0.0
        while not stop.is_set():
            self.wake.clear()
            now = time.monotonic()
            if now >= retry_at:
                try:
                    result = self.send_once()
                except Exception as exc:  # a bug or the disk: say so, try again later
                    log.warning("sending reports failed: %s", exc)
                    result = Result(kept=1, errors=[str(exc)])
                if result.kept:
                    self.failures += 1
                    delay = self._backoff()
                    retry_at = time.monotonic() + delay
                    level = logging.WARNING if self.failures == 1 else logging.DEBUG
                    log.log(
                        level,
                        "%d report(s) kept for the fleet service (%s); next try in %.0f s",
                        result.kept,
                        result.errors[-1],
                        delay,
                    )
                else:
                    if self.failures:
                        log.info("the fleet service takes reports again")
                    self.failures = 0
                    retry_at = 0.0
            heartbeat_at = self._heartbeat_at()
            wait_until = heartbeat_at if retry_at <= now else min(heartbeat_at, retry_at)
            # Event.wait takes no infinity; an hour is as good (a wake comes earlier).
            self.wake.wait(min(3600.0, max(0.05, wait_until - time.monotonic())))
            if stop.is_set():
                break
            if time.monotonic() >= heartbeat_at:
                self.after_poll()

    def start(self, stop: threading.Event) -> threading.Thread:
        """Run :meth:`run` in a daemon thread (it never keeps the process alive)."""
        thread = threading.Thread(
            target=self.run, args=(stop,), name="edgepack-reporter", daemon=True
        )
        thread.start()
        return thread
