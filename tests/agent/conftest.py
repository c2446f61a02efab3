"""Fixtures for the agent's tests: a served repository and an enrolled device."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from device_agent import config, loop
from device_agent.agent import Agent
from device_agent.outcome import Outcome
from tests.agent._support import World


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World.create(tmp_path / "world")
    yield w
    w.server.stop()


@pytest.fixture
def data(world: World, tmp_path: Path) -> Path:
    d = tmp_path / "data"
    world.enroll(d)
    return d


def poll(data_dir: Path) -> Outcome:
    """One poll as `edgepack-agent run --once` does it; the outcome of the one model."""
    outcomes = loop.poll_once(Agent(config.load(data_dir)))
    assert len(outcomes) == 1
    return outcomes[0]
