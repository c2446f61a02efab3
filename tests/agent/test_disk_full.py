"""A full disk during download and during install, on a small tmpfs holding DATA."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_agent import config, loop
from device_agent.agent import Agent
from device_agent.slots import Slots
from tests.agent._support import MODEL, World, fast_limits
from tests.agent.conftest import poll

BIG = 1_500_000  # bytes of incompressible weights in release 2.0.0


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """Leave about ``leave`` bytes free on the tmpfs."""
    import shutil

    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))
    return filler


def _setup(
    world: World, disk: Path, at_rest: str = "encrypted", **limits: object
) -> tuple[Path, str]:
    data = disk / "data"
    world.enroll(data, fast_limits(**limits), at_rest=at_rest)
    world.publish("1.0.0", 2.0, pad_bytes=100_000)
    assert poll(data).action == "installed"
    v1 = str(Slots(data, MODEL).current())
    world.publish("2.0.0", 3.0, pad_bytes=BIG)
    return data, v1


@pytest.mark.parametrize(
    ("leave", "at_rest"),
    [(200_000, "encrypted"), (2_000_000, "plain")],
    ids=["during-download", "during-install"],  # only a plain install writes a second copy
)
def test_disk_fills_up_mid_update(world: World, disk: Path, leave: int, at_rest: str) -> None:
    data, v1 = _setup(world, disk, at_rest)
    filler = _fill(disk, leave)
    # Another process takes the space after the check: a negative margin (in memory only;
    # config.toml refuses one) switches the free-space check off to let the update start.
    cfg = config.load(data)
    cfg.limits.free_space_margin_bytes = -(10**9)
    out = loop.poll_once(Agent(cfg))[0]
    assert out.action == "error" and "space" in str(out.error)
    slots = Slots(data, MODEL)
    assert slots.current() == v1 and slots.installed() == [v1]
    assert not list((data / "staging").rglob("*.onnx"))
    filler.unlink()
    out = poll(data)
    assert out.action == "installed", out.error
    assert str(slots.current()).startswith("2.0.0") and v1 in slots.installed()


def test_an_encrypted_install_fits_where_a_plain_one_does_not(world: World, disk: Path) -> None:
    """The space a plain install needs for its decrypted copy is not needed at all."""
    data, v1 = _setup(world, disk)
    filler = _fill(disk, 2_000_000)  # the download fits; a second, decrypted copy would not
    out = poll(data)
    assert out.action == "installed", out.error
    assert str(Slots(data, MODEL).current()).startswith("2.0.0")
    assert v1 in Slots(data, MODEL).installed()
    filler.unlink()


def test_free_space_check_refuses_before_downloading(world: World, disk: Path) -> None:
    data, v1 = _setup(world, disk)
    _fill(disk, 500_000)
    world.server.requests.clear()
    out = poll(data)
    assert out.action == "error" and "bytes free" in str(out.error)
    assert world.server.bundle_requests() == []
    assert Slots(data, MODEL).current() == v1
