"""The status document: what each model runs, when it was checked, what went wrong.

``edgepack-agent status --json`` prints it and the agent writes it to
``DATA/status.json`` after each poll, atomically, for other tools to read.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from device_agent import _atomic
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
) -> dict[str, Any]:
    """Assemble the status of every followed model from the journal and the last poll."""
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
                "repairs": list(mj.repairs),
                "pending": (
                    mj.update.version
                    if mj.update and mj.state.value not in ("idle", "committed")
                    else None
                ),
            }
        )
        entry.update(poll.get(name, {}))
        models[name] = entry
    return {
        "format": 1,
        "agent_version": __version__,
        "device_id": config.device_id,
        "channel": config.channel,
        "stale": stale,
        "last_poll": time.time() if poll or stale else previous.get("last_poll"),
        "models": models,
    }


def write(data_dir: Path, document: dict[str, Any]) -> None:
    """Write ``DATA/status.json`` atomically."""
    _atomic.write_json(data_dir / STATUS_NAME, document)
