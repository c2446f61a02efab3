"""A damaged journal is not a crash loop: the previous copy is restored, or the running
revision is adopted from the slots on disk, and the status says what happened."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from device_agent import status
from device_agent.slots import Slots
from tests.agent._support import MODEL, World
from tests.agent.conftest import poll
from tests.agent.test_cli import agent


def _unknown_state(raw: bytes) -> bytes:
    return raw.replace(b'"idle"', b'"exploding"').replace(b'"committed"', b'"exploding"')


DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "truncated": lambda raw: raw[: len(raw) // 2],
    "empty": lambda raw: b"",
    "a list": lambda raw: b"[]",
    "no models": lambda raw: b'{"models": []}',
    "unknown state": _unknown_state,
}


def _run_once(data: Path) -> dict[str, object]:
    out = agent("run", "--once", "--json", "--data-dir", str(data))
    assert out.returncode == 0, out.stderr
    assert "internal error" not in out.stderr and "Traceback" not in out.stderr
    outcomes = json.loads(out.stdout)
    assert len(outcomes) == 1
    result: dict[str, object] = outcomes[0]
    return result


@pytest.mark.parametrize("how", sorted(DAMAGE))
@pytest.mark.parametrize("previous_too", [False, True], ids=["journal", "journal-and-copy"])
def test_a_damaged_journal_is_recovered(
    world: World, data: Path, how: str, previous_too: bool
) -> None:
    world.publish("1.0.0", 2.0)
    assert poll(data).action == "installed"
    running = Slots(data, MODEL).current()
    journal = data / "state.json"
    assert (data / "state.json.prev").is_file()  # kept by the save before the last
    journal.write_bytes(DAMAGE[how](journal.read_bytes()))
    if previous_too:
        (data / "state.json.prev").write_bytes(b"\x00garbage")
    world.server.requests.clear()
    out = _run_once(data)
    assert out["action"] == "up-to-date", out
    assert Slots(data, MODEL).current() == running
    assert world.server.bundle_requests() == []  # adopted, not downloaded again
    repairs = status.load(data)["models"][MODEL]["repairs"]
    assert repairs and "journal was damaged" in repairs[-1]
    # The journal is whole again: a local command works on it.
    out2 = agent("list", MODEL, "--data-dir", str(data))
    assert out2.returncode == 0, out2.stderr
