"""Names that become paths: a typo or an insider must not make the agent delete or write
outside its own folders (model, channel and cohort names at enrolment and in
``config.toml``; revision names; the TUF target's sha256 that names a download)."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_agent import config, loop
from device_agent.agent import Agent
from device_agent.slots import Slots, UnsafeDeletionError, remove_tree
from edgepack.errors import InvalidInputError
from tests.agent._support import MODEL, World
from tests.agent._tufrepo import TEAM
from tests.agent.conftest import poll
from tests.agent.test_cli import agent

HOSTILE = ["../../victim", "..", "", ".", "digits\n", "Digits_Bad", "a/b"]


def _victim(base: Path) -> Path:
    victim = base / "victim"
    victim.mkdir(parents=True, exist_ok=True)
    (victim / "precious.txt").write_text("keep me")
    return victim


@pytest.mark.parametrize("name", HOSTILE)
def test_enroll_refuses_a_model_name_that_is_not_a_folder_name(
    world: World, tmp_path: Path, name: str
) -> None:
    victim = _victim(tmp_path)
    data = tmp_path / "a" / "b" / "dev"
    out = agent(
        "enroll",
        *("--repo-url", world.server.url, "--root", str(world.root_json)),
        *("--model", name, "--data-dir", str(data)),
    )
    assert out.returncode == 3, out.stderr
    assert "invalid model name" in out.stderr and "Traceback" not in out.stderr
    assert not data.exists()
    assert (victim / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize(("option", "value"), [("--channel", "prod"), ("--cohort", "../x")])
def test_enroll_refuses_a_bad_channel_or_cohort(
    world: World, tmp_path: Path, option: str, value: str
) -> None:
    data = tmp_path / "dev"
    out = agent(
        "enroll",
        *("--repo-url", world.server.url, "--root", str(world.root_json)),
        *("--model", MODEL, option, value, "--data-dir", str(data)),
    )
    assert out.returncode == 3 and value in out.stderr, out.stderr
    assert not data.exists()


@pytest.mark.parametrize("name", ["..", "", "../../victim"])
def test_a_hand_edited_config_with_a_hostile_model_loses_nothing(
    world: World, data: Path, tmp_path: Path, name: str
) -> None:
    victim = _victim(tmp_path)
    world.publish("1.0.0", 2.0)
    assert poll(data).action == "installed"
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    cfg = (data / "config.toml").read_text()
    (data / "config.toml").write_text(
        cfg.replace(f'models = ["{MODEL}"]', f'models = ["{MODEL}", "{name}"]')
    )
    out = agent("run", "--once", "--data-dir", str(data))
    assert out.returncode == 3, out.stderr
    assert "invalid model name" in out.stderr and "enrol again" in out.stderr
    # The other model's revisions, the device's keys, the TUF cache and the config are all there.
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
    assert (data / "keys" / "identity.key").exists() and (data / "keys" / "recipient.key").exists()
    assert (data / "tuf" / "root.json").exists()
    assert Slots(data, MODEL).current() is not None
    assert (victim / "precious.txt").read_text() == "keep me"


def test_every_deletion_stays_inside_its_folder(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    inside = tmp_path / "data" / "models" / "m"
    inside.mkdir(parents=True)
    for path in (victim, inside / ".." / ".." / ".." / "victim", inside, inside / ".."):
        with pytest.raises(UnsafeDeletionError):
            remove_tree(path, inside=inside)
    # A symlinked parent does not smuggle a deletion out either.
    (inside / "link").symlink_to(tmp_path)
    with pytest.raises(UnsafeDeletionError):
        remove_tree(inside / "link" / "victim", inside=inside)
    slots = Slots(tmp_path / "data", "m")
    for revision in ("../../../victim", "..", "", "."):
        with pytest.raises(UnsafeDeletionError):
            slots.remove(revision)
    with pytest.raises(InvalidInputError):
        Slots(tmp_path / "data", "")
    assert (victim / "precious.txt").read_text() == "keep me"


def test_a_sha256_that_is_a_path_is_refused_before_anything_is_written(
    world: World, data: Path, tmp_path: Path
) -> None:
    """A team-key insider signs a target whose sha256 is ``../../OUTSIDE/victim``."""
    outside = tmp_path / "OUTSIDE"
    outside.mkdir()
    (outside / "victim.part").write_bytes(b"precious")
    world.publish("1.0.0", 2.0, promote=False)
    target = world.targets["1.0.0"]
    world.repo.delegated[TEAM].signed.targets[target].hashes = {"sha256": "../../OUTSIDE/victim"}
    world.repo.commit({TEAM})
    world.repo.promote("1.0.0", target)
    out = loop.poll_once(Agent(config.load(data)))[0]
    assert out.action == "error" and "64 lowercase hex" in str(out.error)
    assert (outside / "victim.part").read_bytes() == b"precious"
    assert world.server.bundle_requests() == []
