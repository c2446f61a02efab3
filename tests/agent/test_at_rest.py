"""Installed revisions are re-checked: against the signed manifest when a session opens
and when a poll finds the device up to date; a ``current`` link that leaves the model's
folder is not a running revision. Damage is repaired from an intact revision or by
installing the release again, and said in the status."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from device_agent import config, open_session, status
from device_agent.errors import CorruptRevisionError
from device_agent.slots import Slots
from tests.agent._support import MODEL, World
from tests.agent.conftest import poll

X = np.arange(4, dtype=np.float32).reshape(1, 4)


@pytest.fixture
def data(world: World, tmp_path: Path) -> Path:
    """Plain revisions, whose files are damaged one by one here (encrypted revisions:
    tests/agent/test_encrypted_at_rest.py)."""
    d = tmp_path / "data"
    world.enroll(d, at_rest="plain")
    return d


def _run(data: Path) -> np.ndarray:
    session = open_session(MODEL, data_dir=data)
    return np.asarray(session.run(None, {"X": X})[0])


def _damage(path: Path, how: str) -> None:
    path.parent.chmod(0o750)
    if how == "delete":
        path.unlink()
        return
    path.chmod(0o640)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40  # an exponent bit of the last weight
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["flip", "delete"])
def test_a_damaged_revision_is_refused_then_repaired(world: World, data: Path, how: str) -> None:
    world.publish("1.0.0", 2.0)
    assert poll(data).action == "installed"
    good = _run(data)
    revision = str(Slots(data, MODEL).current())
    _damage(Slots(data, MODEL).revision_dir(revision) / "model.onnx", how)
    with pytest.raises(CorruptRevisionError, match="damaged"):
        open_session(MODEL, data_dir=data)
    out = poll(data)
    assert out.action == "installed", out  # not "up-to-date": the same release, afresh
    assert np.array_equal(_run(data), good)
    assert Slots(data, MODEL).verify(str(Slots(data, MODEL).current())) is None
    repairs = status.load(data)["models"][MODEL]["repairs"]
    assert repairs and "damaged" in repairs[-1]


def test_damage_falls_back_to_the_previous_intact_revision(world: World, data: Path) -> None:
    world.publish("1.0.0", 2.0)
    poll(data)
    v1 = Slots(data, MODEL).current()
    world.publish("2.0.0", 3.0)
    poll(data)
    v2 = str(Slots(data, MODEL).current())
    _damage(Slots(data, MODEL).revision_dir(v2) / "model.onnx", "flip")
    world.server.fault = "hang"  # the release cannot be fetched again right now
    world.server.hang_s = 3.0
    poll(data)
    assert Slots(data, MODEL).current() == v1  # never left on the damaged one
    assert np.allclose(_run(data), X * 2.0 + 1)


def test_current_pointing_outside_the_model_folder_is_not_running(
    world: World, data: Path, tmp_path: Path
) -> None:
    world.publish("1.0.0", 2.0)
    poll(data)
    good = str(Slots(data, MODEL).current())
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(Slots(data, MODEL).revision_dir(good), elsewhere)
    link = data / "models" / MODEL / "current"
    link.unlink()
    link.symlink_to(elsewhere)
    assert Slots(data, MODEL).current() is None and Slots(data, MODEL).foreign_current()
    assert poll(data).action == "up-to-date"  # recovery re-pointed it first
    assert (data / "models" / MODEL / "current").readlink() == Path(good)
    assert "not a link" in status.load(data)["models"][MODEL]["repairs"][-1]
    cfg = config.load(data)
    assert cfg.models == [MODEL]
