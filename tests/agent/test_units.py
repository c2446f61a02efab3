"""The pure parts and the small edges: state table, journal, slots, config, back-off, fetcher."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from tuf.api import exceptions

from device_agent import config, loop
from device_agent.config import AgentConfig, Limits
from device_agent.fetcher import AgentFetcher
from device_agent.slots import Slots
from device_agent.state import (
    RECOVERY,
    TRANSITIONS,
    IllegalTransitionError,
    Journal,
    Recovery,
    Revision,
    State,
    Update,
)
from tests.agent._support import FaultServer


def test_every_state_has_transitions_and_a_recovery() -> None:
    assert set(TRANSITIONS) == set(State) == set(RECOVERY)
    # only a known-good candidate may be switched to after a crash
    assert RECOVERY[State.SWITCHING] is Recovery.FINISH_SWITCH
    for s in (State.VERIFYING, State.STAGING, State.HEALTH_CHECKING):
        assert RECOVERY[s] is Recovery.DISCARD_STAGING
    # switching can only end in committed: no way back to a half-switched state
    assert TRANSITIONS[State.SWITCHING] == {State.COMMITTED}


def test_journal_saves_on_entry_and_refuses_illegal_moves(tmp_path: Path) -> None:
    j = Journal.load(tmp_path)
    upd = Update("models/m/m.epk", "1.0.0", "ab" * 32, 10, "1.0.0-abab", None)
    j.enter("m", State.CHECKING)
    j.enter("m", State.DOWNLOADING, update=upd)
    j.model("m").revisions["r"] = Revision("1.0.0", "ab" * 32, "t", True, 1.0)
    j.save()
    again = Journal.load(tmp_path)
    assert again.model("m").state is State.DOWNLOADING
    assert again.model("m").update == upd
    assert again.model("m").revision_for("ab" * 32) == "r"
    with pytest.raises(IllegalTransitionError):
        again.enter("m", State.SWITCHING)
    assert not list(tmp_path.glob(".*.tmp"))


def test_slots_switch_is_a_rename_and_keeps_revisions_read_only(tmp_path: Path) -> None:
    slots = Slots(tmp_path, "m")
    for rev in ("a", "b"):
        staged = slots.staging_dir(rev)
        staged.mkdir(parents=True)
        (staged / "model.onnx").write_bytes(rev.encode())
        slots.install(staged, rev)
    assert slots.current() is None
    slots.switch("a")
    assert (tmp_path / "models/m/current/model.onnx").read_bytes() == b"a"
    slots.switch("b")
    assert slots.current() == "b" and slots.installed() == ["a", "b"]
    assert not (slots.revision_dir("a") / "model.onnx").stat().st_mode & 0o222
    with pytest.raises(ValueError, match="active"):
        slots.remove("b")
    slots.remove("a")
    assert slots.installed() == ["b"]


def test_config_round_trip_and_unknown_keys(tmp_path: Path) -> None:
    cfg = AgentConfig(tmp_path, "dev-1", "http://x/metadata/", "http://x/targets/", ["m"])
    cfg.limits.bandwidth_bps = 1000
    config.save(cfg)
    assert config.load(tmp_path) == cfg
    assert (tmp_path / "config.toml").stat().st_mode & 0o777 == 0o600
    (tmp_path / "config.toml").write_text('device_id = "x"\nbogus = 1\n')
    with pytest.raises(Exception, match="bogus"):
        config.load(tmp_path)


def test_data_dir_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("EDGEPACK_DATA_DIR", raising=False)
    assert config.resolve_data_dir(None) == Path("/var/lib/edgepack")
    monkeypatch.setenv("EDGEPACK_DATA_DIR", str(tmp_path))
    assert config.resolve_data_dir(None) == tmp_path


def test_backoff_grows_is_capped_and_jittered() -> None:
    limits = Limits(poll_interval_s=10, poll_jitter=0.2, backoff_max_s=100)
    rng = random.Random(1)
    assert 8 <= loop.next_delay(0, limits, rng) <= 12
    assert 16 <= loop.next_delay(1, limits, rng) <= 24
    assert 80 <= loop.next_delay(30, limits, rng) <= 120
    spread = {round(loop.next_delay(0, limits, rng), 3) for _ in range(20)}
    assert len(spread) > 10


def test_fetcher_resumes_with_range_and_restarts_without(tmp_path: Path) -> None:
    (tmp_path / "f.bin").write_bytes(os.urandom(100_000))
    server = FaultServer(tmp_path)
    server.fault_match = "f.bin"
    try:
        fetcher = AgentFetcher(Limits(chunk_bytes=8192))
        part = tmp_path / "dl" / "f.part"
        server.fault, server.cut_at = "cut", 30_000
        with pytest.raises(exceptions.DownloadError):
            fetcher.download_resumable(f"{server.url}/f.bin", part, 100_000)
        assert 0 < part.stat().st_size < 100_000
        server.fault = None
        server.ranges = False  # a server ignoring Range: start over, still correct
        fetcher.download_resumable(f"{server.url}/f.bin", part, 100_000)
        assert part.read_bytes() == (tmp_path / "f.bin").read_bytes()
        with pytest.raises(exceptions.DownloadLengthMismatchError):
            fetcher.download_resumable(f"{server.url}/f.bin", tmp_path / "dl" / "g", 50_000)
    finally:
        server.stop()


def test_fetcher_bandwidth_cap(tmp_path: Path) -> None:
    import time

    (tmp_path / "f.bin").write_bytes(os.urandom(60_000))
    fetcher = AgentFetcher(Limits(bandwidth_bps=200_000, chunk_bytes=10_000))
    start = time.monotonic()
    data = b"".join(fetcher.fetch((tmp_path / "f.bin").as_uri()))
    assert len(data) == 60_000 and time.monotonic() - start >= 0.25


def test_offline_source_missing_file_is_404(tmp_path: Path) -> None:
    fetcher = AgentFetcher()
    with pytest.raises(exceptions.DownloadHTTPError) as info:
        list(fetcher.fetch((tmp_path / "nope.json").as_uri()))
    assert info.value.status_code == 404


def test_backoff_counts_stale_and_errors_not_refused_releases() -> None:
    from device_agent.outcome import Outcome

    assert loop.failed([Outcome("m", "kept", error="unreachable", checked=False)])
    assert loop.failed([Outcome("m", "error", error="cut")])
    assert not loop.failed([Outcome("m", "kept", error="2.0.0 failed here before")])
    assert not loop.failed([Outcome("m", "failed", error="health check failed")])
    assert not loop.failed([Outcome("m", "up-to-date")])
