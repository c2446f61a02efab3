"""What a forked agent run does in the crash harness (a module, so the forkserver can import it)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from device_agent import _crashpoint, config, loop
from device_agent.agent import Agent

PRELOAD = ["device_agent.agent", "device_agent.loop", "onnxruntime", "edgepack.bundle", __name__]


def run_once(data_dir: str, crash_spec: str, watch: str) -> None:
    """One `run --once`, with the crash point armed, temp files and cwd pointed at ``watch``."""
    os.chdir(Path(watch) / "cwd")
    os.environ["TMPDIR"] = str(Path(watch) / "tmp")
    os.environ["HOME"] = str(Path(watch) / "home")
    tempfile.tempdir = None
    _crashpoint.arm(crash_spec)
    cfg = config.load(Path(data_dir))
    config.confine_temp(cfg.data_dir)  # as the CLI does
    loop.poll_once(Agent(cfg))
