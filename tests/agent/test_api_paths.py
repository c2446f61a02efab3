"""The application API takes the data directory as a Path, a str or any os.PathLike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device_agent import active_model_path, open_session
from tests.agent._support import MODEL, World
from tests.agent.conftest import poll


class _PathLike:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __fspath__(self) -> str:
        return str(self.path)


@pytest.fixture
def data(world: World, tmp_path: Path) -> Path:
    """A device whose models are kept plain, so that they have a path to hand out."""
    d = tmp_path / "data"
    world.enroll(d, at_rest="plain")
    return d


def test_open_session_accepts_a_str_and_a_pathlike(world: World, data: Path) -> None:
    world.publish("1.0.0", 2.0)
    assert poll(data).action == "installed"
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    for given in (str(data), _PathLike(data), data):
        session = open_session(MODEL, data_dir=given)
        np.testing.assert_allclose(session.run(None, {"X": x})[0], x * 2.0 + 1)
        assert active_model_path(MODEL, data_dir=given).is_file()


def test_a_relative_str_is_taken_from_the_working_directory(
    world: World, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.publish("1.0.0", 2.0)
    assert poll(data).action == "installed"
    monkeypatch.chdir(data.parent)
    assert active_model_path(MODEL, data_dir=data.name).is_relative_to(data)
