"""The application's monitored session: inference as usual, folded into running statistics.

:class:`MonitoredSession` wraps an onnxruntime ``InferenceSession`` (everything but
``run`` is delegated unchanged). ``run`` asks onnxruntime for the outputs the caller
named plus those the reference monitors, returns only what the caller asked for, and
folds the batch into an :class:`edgepack.monitoring.Monitor` — for the calls its
sampler takes (it keeps its cost under a share of the measured inference time; a call
it skips is the plain run). The counts are flushed to
``DATA/monitor/NAME/REVISION/state.json`` atomically every ``monitor_flush_rows``
monitored inferences or ``monitor_flush_s`` seconds and when the session closes (``close()``,
a ``with`` block, or interpreter exit), and taken back by the next
:func:`device_agent.open_session`, so statistics survive restarts.

Two promises: nothing of a raw input is ever written (the state is bin counts and sums),
and monitoring never breaks inference — an error in it is logged once and the answer
is returned all the same; a folder the application cannot write leaves monitoring
in memory; an unreadable, foreign or missing state starts afresh, and says so.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from device_agent import _atomic, monitorstore
from edgepack.monitoring import Monitor

log = logging.getLogger(__name__)


class MonitoredSession:
    """An ``InferenceSession`` of one revision whose ``run`` also feeds its monitor."""

    def __init__(
        self,
        session: Any,
        *,
        data_dir: Path,
        name: str,
        revision: str,
        reference: Mapping[str, Any],
        overrides: Mapping[str, float] | None = None,
        flush_rows: int = 1000,
        flush_s: float = 60.0,
        clock: Any = time.monotonic,
    ) -> None:
        self._session = session
        self.name = name
        self.revision = revision
        self.monitor = Monitor(reference, overrides)
        self.state_path = monitorstore.revision_dir(data_dir, name, revision) / (
            monitorstore.STATE_NAME
        )
        self._flush_rows = max(1, flush_rows)
        self._flush_s = flush_s
        self._clock = clock
        self._lock = threading.Lock()
        self._unflushed = 0
        self._flushed_at = clock()
        self.persistent = True
        """False once the state folder proved unwritable: monitoring goes on in memory."""
        self._failed_once = False
        self._closed = False
        self._monitored_outputs = set(self.monitor.reference["outputs"])
        self._restore()
        atexit.register(self.flush)

    # -- delegation --------------------------------------------------------------
    def __getattr__(self, attr: str) -> Any:
        return getattr(self._session, attr)

    @property
    def session(self) -> Any:
        """The wrapped onnxruntime session."""
        return self._session

    def __enter__(self) -> MonitoredSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- inference -----------------------------------------------------------------
    def run(
        self,
        output_names: Sequence[str] | None,
        input_feed: Mapping[str, Any],
        run_options: Any = None,
    ) -> list[Any]:
        """``InferenceSession.run``, with the inputs and outputs folded into the monitor."""
        with self._lock:
            skipped = self._skips()
        if skipped:  # the sampler passes this call by: the plain run, nothing more
            return list(self._session.run(output_names, input_feed, run_options))
        all_names = [o.name for o in self._session.get_outputs()]
        wanted = list(output_names) if output_names else all_names
        extra = [n for n in all_names if n in self._monitored_outputs and n not in wanted]
        start = time.perf_counter()
        results = self._session.run(wanted + extra, input_feed, run_options)
        seconds = time.perf_counter() - start
        try:
            self._observe(input_feed, dict(zip(wanted + extra, results, strict=True)), seconds)
        except Exception as exc:  # monitoring must never cost the application its answer
            self._fail_once("could not fold an inference into the statistics", exc)
        return list(results[: len(wanted)])

    def _skips(self) -> bool:
        try:
            return bool(self.monitor.skips())
        except Exception:  # a sampler fault: take the call
            return False

    def _observe(
        self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], seconds: float
    ) -> None:
        rows = max((len(v) for v in inputs.values() if getattr(v, "ndim", 0)), default=1)
        with self._lock:
            self.monitor.observe(inputs, outputs, seconds)
            self._unflushed += rows
            due = self._unflushed >= self._flush_rows or (
                self._clock() - self._flushed_at >= self._flush_s
            )
        if due:
            self.flush()

    # -- persistence -----------------------------------------------------------------
    def _restore(self) -> None:
        try:
            raw = _atomic.read_json(self.state_path)
        except (OSError, ValueError) as exc:
            log.warning(
                "%s %s: the monitoring state is unreadable (%s); starting fresh",
                self.name,
                self.revision,
                exc,
            )
            return
        if raw is None:  # a first session, or the file was deleted: say so either way
            log.info(
                "%s %s: no monitoring state in %s (a first session, or it was deleted); "
                "starting fresh",
                self.name,
                self.revision,
                self.state_path.parent,
            )
            return
        fits = (
            isinstance(raw, dict)
            and raw.get("format") == monitorstore.STATE_FORMAT
            and raw.get("revision") == self.revision
            and isinstance(raw.get("state"), dict)
            and self.monitor.restore(raw["state"])
        )
        if not fits:
            log.warning(
                "%s %s: the monitoring state does not fit this revision's reference; "
                "starting fresh",
                self.name,
                self.revision,
            )

    def flush(self) -> None:
        """Write the counts now (atomically); in memory only once the folder proved unwritable."""
        with self._lock:
            self._flushed_at = self._clock()
            self._unflushed = 0
            if not self.persistent:
                return
            doc = {
                "format": monitorstore.STATE_FORMAT,
                "revision": self.revision,
                "updated_at": round(time.time(), 3),
                "state": self.monitor.to_dict(),
            }
            try:
                _atomic.write_json(self.state_path, doc, mode=0o660)
            except PermissionError as exc:
                self.persistent = False
                log.warning(
                    "%s %s: cannot write %s (%s); monitoring goes on in memory only",
                    self.name,
                    self.revision,
                    self.state_path.parent,
                    exc.strerror or exc,
                )
            except (OSError, ValueError) as exc:
                self._fail_once(f"could not write {self.state_path}", exc)

    def close(self) -> None:
        """Flush the statistics; the session stays usable (onnxruntime has no close)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.flush)
        self.flush()

    def _fail_once(self, what: str, exc: BaseException) -> None:
        if not self._failed_once:
            self._failed_once = True
            log.warning("%s %s: monitoring %s: %s", self.name, self.revision, what, exc)
