"""Bulk-load a synthetic fleet into a store, fast: for the fleet-status benchmark and tests.

Rows go straight in with one ``executemany`` per table (no signing, no ingest), in
a fixed pattern by device number ``i``, so the expected figures are known:

* ``i % 100 < 2``: stale (last report a day old), running ``new``
* ``2 <= i % 100 < 7``: refused ``new`` ("health check failed: …", two variants), running ``old``
* ``7 <= i % 100 < 10``: ``new`` pending, running ``old`` (installing)
* otherwise: running ``new``
"""

from __future__ import annotations

import json
import time
from typing import Any

from edgepack.fleet.sql import SQLStore

MODEL = "detector"
CHANNEL = "stable"
OLD = "1.0.0"
NEW = "2.0.0"


def expected(n_devices: int) -> dict[str, Any]:
    """The figures fleet_status gives for ``new`` after ``fill(store, n_devices)``."""
    buckets = [i % 100 for i in range(n_devices)]
    return {
        "stale": sum(b < 2 for b in buckets),
        "failed": sum(2 <= b < 7 for b in buckets),
        "installing": sum(7 <= b < 10 for b in buckets),
        "running": sum(b >= 10 for b in buckets),
    }


def fill(store: SQLStore, n_devices: int, *, now: float | None = None) -> None:
    """Register ``n_devices`` synthetic devices, each with one reported state."""
    now = time.time() if now is None else now
    models = json.dumps([MODEL])
    devices = []
    states = []
    for i in range(n_devices):
        device_id = f"dev-{i:020x}"
        bucket = i % 100
        seen = now - 86_400 if bucket < 2 else now - (i % 60)
        version, pending, refused, action, error = NEW, None, "{}", "install", None
        if 2 <= bucket < 7:
            version, action = OLD, "failed"
            error = f"health check failed: p95 latency {400 + i % 7} ms over the 200 ms budget"
            if bucket == 6:
                error = "health check failed (the session could not open)"
            refused = json.dumps({NEW: error})
        elif 7 <= bucket < 10:
            version, pending, action = OLD, NEW, "download"
        devices.append(
            (device_id, f"{i:064x}", "", models, CHANNEL, "", "generic-x86_64", "x86_64",
             now - 7 * 86_400, 1, seen, "{}")
        )  # fmt: skip
        states.append(
            (device_id, MODEL, CHANNEL, version, "r" + version, "running", action, error,
             refused, pending, 12.5, 0, seen)
        )  # fmt: skip
    store.executemany(
        "INSERT INTO devices (device_id, identity, recipient, models, channel, cohort, profile, "
        "architecture, registered_at, last_counter, last_seen, last_report) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        devices,
    )
    store.executemany(
        "INSERT INTO model_states (device_id, model, channel, version, revision, state, "
        "last_action, last_error, refused, pending, health_latency_ms, stale, reported_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        states,
    )
