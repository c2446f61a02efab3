"""End to end: a real TUF repository over loopback HTTP, real bundles, real onnxruntime."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from device_agent import config, open_session, status
from device_agent.agent import Agent, locked
from device_agent.errors import NoRevisionError
from device_agent.slots import Slots
from tests.agent._support import MODEL, World, fast_limits
from tests.agent.conftest import poll


def current(data: Path) -> str | None:
    return Slots(data, MODEL).current()


def test_install_then_nothing_new_costs_only_timestamp(world: World, data: Path) -> None:
    world.publish("1.0.0", 2.0)
    out = poll(data)
    assert out.action == "installed" and out.version == "1.0.0"
    rev = current(data)
    assert rev is not None and rev.startswith("1.0.0-")
    # the revision is read-only, and the session computes Y = 2X + 1
    rev_dir = data / "models" / MODEL / rev
    assert not (rev_dir.stat().st_mode & 0o222)
    assert all(not (f.stat().st_mode & 0o222) for f in rev_dir.iterdir())
    sess = open_session(MODEL, data)
    y = sess.run(None, {"X": np.ones((1, 4), np.float32)})[0]
    assert np.allclose(y, 3.0)
    world.server.requests.clear()
    assert poll(data).action == "up-to-date"
    fetched = [p for p, _ in world.server.requests]
    assert fetched == ["/metadata/2.root.json", "/metadata/timestamp.json"]
    doc = json.loads((data / "status.json").read_text())
    assert doc["models"][MODEL]["version"] == "1.0.0" and doc["stale"] is False
    # a poll with nothing new does not rewrite the journal (atomic writes replace the inode)
    inode = (data / "state.json").stat().st_ino
    assert poll(data).action == "up-to-date"
    assert (data / "state.json").stat().st_ino == inode


def test_operator_rollback_switches_to_cached_revision_without_download(
    world: World, data: Path
) -> None:
    world.publish("1.0.0", 2.0)
    poll(data)
    old = current(data)
    world.publish("2.0.0", 3.0)
    assert poll(data).action == "installed"
    new = current(data)
    assert new != old and (data / "models" / MODEL / str(old)).is_dir()  # previous kept
    world.repo.rollback()
    world.server.requests.clear()
    start = time.monotonic()
    out = poll(data)
    assert out.action == "rolled-back" and current(data) == old
    assert time.monotonic() - start < 1.0
    assert world.server.bundle_requests() == []


def test_keeps_two_revisions_and_never_the_older_ones(world: World, data: Path) -> None:
    for i, v in enumerate(["1.0.0", "2.0.0", "3.0.0"]):
        world.publish(v, 2.0 + i)
        assert poll(data).action == "installed"
    installed = Slots(data, MODEL).installed()
    assert [r.split("-")[0] for r in installed] == ["2.0.0", "3.0.0"]


def test_failed_health_check_is_kept_out_and_not_retried(world: World, data: Path) -> None:
    world.publish("1.0.0", 2.0)
    poll(data)
    good = current(data)
    world.publish("2.0.0", 3.0, bad_golden=True)
    out = poll(data)
    assert out.action == "failed" and "health check failed" in str(out.error)
    assert current(data) == good
    # The line for a person names the refused release, and the kept one apart from it.
    line = out.describe()
    assert line.startswith(f"{MODEL}: failed 2.0.0 (") and line.endswith(f"; running {good}")
    assert [r.split("-")[0] for r in Slots(data, MODEL).installed()] == ["1.0.0"]
    world.server.requests.clear()
    out = poll(data)
    assert out.action == "kept" and "2.0.0 failed here before" in str(out.error)
    assert world.server.bundle_requests() == []  # not retried
    doc = status.load(data)
    assert "2.0.0" in doc["models"][MODEL]["failed_releases"]
    world.publish("3.0.0", 4.0)  # a newer release is tried
    assert poll(data).action == "installed"


def test_tampered_bundle_is_refused_before_install(world: World, data: Path) -> None:
    world.publish("1.0.0", 2.0)
    poll(data)
    good = current(data)
    # a bundle signed by someone outside the device's trust policy
    from edgepack import keys

    trusted = world.producer_key
    world.producer_key = keys.generate_signing_key()
    world.publish("2.0.0", 3.0)
    out = poll(data)
    assert out.action == "failed" and current(data) == good
    assert list((data / "staging").rglob("*")) == []
    assert poll(data).action == "kept"  # those bytes are not tried again
    # the same version, signed by the trusted producer (new bytes), is tried and installs
    world.producer_key = trusted
    world.publish("2.0.0", 3.0)
    assert poll(data).action == "installed"


def test_missing_trust_policy_is_a_device_error_not_a_failed_release(
    world: World, tmp_path: Path
) -> None:
    from device_agent import enroll

    d = tmp_path / "dev"
    enroll.enroll(
        d,
        repo_url=world.server.url,
        root=world.root_json,
        models=[MODEL],
        recipient_key=world.fleet_key_path,
        limits=fast_limits(),
    )
    world.publish("1.0.0", 2.0)
    out = poll(d)
    assert out.action == "error" and "trust policy" in str(out.error)
    agent = Agent(config.load(d))
    assert agent.journal.model(MODEL).failed == {}
    assert agent.journal.model(MODEL).failed_bundles == {}


def test_revert_report_bad_and_confirm(world: World, tmp_path: Path) -> None:
    d = tmp_path / "dev"
    world.enroll(d, fast_limits(confirm_window_s=3600.0))
    world.publish("1.0.0", 2.0)
    poll(d)
    v1 = current(d)
    world.publish("2.0.0", 3.0)
    poll(d)
    v2 = current(d)
    agent = Agent(config.load(d))
    assert agent.journal.model(MODEL).confirm is not None
    with locked(d):
        assert agent.report_bad(MODEL) == v1
    assert current(d) == v1
    out = poll(d)  # 2.0.0 is not re-installed
    assert out.action == "kept" and current(d) == v1
    world.publish("3.0.0", 4.0)
    poll(d)
    v3 = current(d)
    agent = Agent(config.load(d))
    with locked(d):
        agent.confirm(MODEL)
    assert agent.journal.model(MODEL).confirm is None
    with locked(d):
        assert agent.revert(MODEL) == v1  # local revert goes to the kept earlier one
    assert current(d) == v1 and v2 != v3


def test_confirmation_window_expiry_rolls_back(world: World, tmp_path: Path) -> None:
    d = tmp_path / "dev"
    world.enroll(d, fast_limits(confirm_window_s=60.0))
    world.publish("1.0.0", 2.0)
    poll(d)
    v1 = current(d)
    world.publish("2.0.0", 3.0)
    poll(d)
    later = Agent(config.load(d), clock=lambda: time.time() + 120)
    with locked(d):
        later.recover()
        later.poll()
    assert current(d) == v1
    assert "confirmation window" in later.journal.model(MODEL).failed["2.0.0"]


def test_revoked_release_is_never_reverted_to(world: World, data: Path) -> None:
    world.publish("1.0.0", 2.0)
    poll(data)
    world.publish("2.0.0", 3.0)
    poll(data)
    world.repo.revoke("1.0.0")
    poll(data)
    agent = Agent(config.load(data))
    with locked(data), pytest.raises(NoRevisionError):
        agent.revert(MODEL)
    assert current(data) is not None and str(current(data)).startswith("2.0.0")


def test_unreachable_repository_keeps_model_and_reports_stale(world: World, data: Path) -> None:
    world.publish("1.0.0", 2.0)
    poll(data)
    rev = current(data)
    world.server.stop()
    out = poll(data)
    assert out.action == "kept" and current(data) == rev
    doc = status.load(data)
    assert doc["stale"] is True and doc["models"][MODEL]["last_error"]
    assert open_session(MODEL, data) is not None


def test_expired_metadata_keeps_model_and_reports_stale(world: World, data: Path) -> None:
    world.publish("1.0.0", 2.0)
    poll(data)
    rev = current(data)
    world.repo.refresh_timestamp(datetime.now(timezone.utc) - timedelta(days=1))
    out = poll(data)
    assert out.action == "kept" and "expired" in str(out.error).lower()
    assert current(data) == rev and status.load(data)["stale"] is True


def test_garbage_metadata_keeps_model(world: World, data: Path) -> None:
    world.publish("1.0.0", 2.0)
    poll(data)
    rev = current(data)
    world.server.fault, world.server.fault_match = "garbage", "timestamp.json"
    assert poll(data).action == "kept" and current(data) == rev


def test_network_cut_resumes_with_range(world: World, data: Path) -> None:
    world.publish("1.0.0", 2.0, pad_bytes=200_000)
    world.server.fault, world.server.cut_at = "cut", 50_000
    out = poll(data)
    assert out.action == "error" and current(data) is None
    parts = list((data / "downloads").glob("*.part"))
    assert len(parts) == 1 and 0 < parts[0].stat().st_size < 200_000
    world.server.fault = None
    world.server.requests.clear()
    assert poll(data).action == "installed"
    ranges = [r for _, r in world.server.bundle_requests()]
    assert ranges and ranges[0] is not None and ranges[0].startswith("bytes=")
    assert list((data / "downloads").iterdir()) == []


def test_garbage_bundle_is_discarded_and_model_kept(world: World, data: Path) -> None:
    world.publish("1.0.0", 2.0)
    poll(data)
    rev = current(data)
    world.publish("2.0.0", 3.0)
    world.server.fault = "garbage"
    out = poll(data)
    assert out.action == "error" and current(data) == rev
    assert list((data / "downloads").iterdir()) == []  # unverified bytes do not stay
    world.server.fault = None
    assert poll(data).action == "installed"


@pytest.mark.parametrize("fault", ["hang", "slow"])
def test_hanging_or_slow_server_times_out(world: World, tmp_path: Path, fault: str) -> None:
    d = tmp_path / "dev"
    world.enroll(d, fast_limits(read_timeout_s=0.5, slow_grace_s=0.3, min_speed_bps=4096))
    world.publish("1.0.0", 2.0, pad_bytes=20_000)
    world.server.fault, world.server.hang_s = fault, 3.0
    start = time.monotonic()
    out = poll(d)
    assert out.action == "error" and current(d) is None
    assert time.monotonic() - start < 2.5


def test_offline_source_directory(world: World, tmp_path: Path) -> None:
    world.publish("1.0.0", 2.0)
    d = tmp_path / "dev"
    world.enroll(d, url=str(world.base / "public"))
    assert poll(d).action == "installed"
    assert world.server.requests == []


def test_older_channel_document_is_ignored(world: World, data: Path) -> None:
    from dataclasses import replace

    world.publish("1.0.0", 2.0)
    world.publish("2.0.0", 3.0)
    poll(data)
    rev = current(data)
    # the operators' role signs a document with a lower sequence naming the old release
    older = replace(world.repo.doc, sequence=1, current=world.repo.doc.previous[0], previous=())
    world.repo.set_channel(older)
    out = poll(data)
    assert out.action == "error" and "older than" in str(out.error)
    assert current(data) == rev


def test_bundle_with_escaping_external_data_is_refused(
    world: World, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnx

    from edgepack.bundle import writer

    # A hostile producer packs with a tool of its own: without our pack's refusal.
    monkeypatch.setattr(writer, "_check_models_as_devices_will", lambda *_: None)

    world.publish("1.0.0", 2.0)
    poll(data)
    good = current(data)
    # a release whose model points its weights outside the revision folder
    src = world.base / "src-evil"
    from tests.agent._support import make_model_dir

    meta = make_model_dir(src, 3.0)
    model = onnx.load(str(src / "model.onnx"))
    w = model.graph.initializer[0]
    w.ClearField("raw_data")
    w.ClearField("float_data")
    w.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", "../../../../etc/hostname"), ("offset", "0"), ("length", "16")):
        e = w.external_data.add()
        e.key, e.value = k, v
    (src / "model.onnx").write_bytes(model.SerializeToString())
    from edgepack import bundle
    from edgepack.signing import ProducerKeySigner

    packed = bundle.pack(
        src,
        world.base / "bundles",
        name=MODEL,
        version="2.0.0",
        recipients=[world.fleet_key.public_key()],
        signer=ProducerKeySigner(world.producer_key),
        health=meta,
    ).path
    world.repo.promote("2.0.0", world.repo.add_bundle(packed, "2.0.0"))
    out = poll(data)
    assert out.action == "failed" and "'..'" in str(out.error)
    assert current(data) == good and len(Slots(data, MODEL).installed()) == 1


def test_crash_loop_ends_with_the_release_marked_failed(world: World, data: Path) -> None:
    from device_agent.agent import MAX_ATTEMPTS
    from device_agent.state import Journal, State, Update

    world.publish("1.0.0", 2.0)
    poll(data)
    good = current(data)
    world.publish("2.0.0", 3.0)
    target = world.targets["2.0.0"]
    info = world.repo.delegated["team"].signed.targets[target]
    sha = info.hashes["sha256"]
    # as if the new model killed the agent during each of its health checks
    for _ in range(MAX_ATTEMPTS):
        j = Journal.load(data)
        mj = j.model(MODEL)
        attempts = mj.update.attempts if mj.update and mj.update.sha256 == sha else 0
        mj.update = Update(target, "2.0.0", sha, info.length, f"2.0.0-{sha[:12]}", good, attempts)
        mj.state = State.HEALTH_CHECKING
        j.save()
        with locked(data):
            Agent(config.load(data)).recover()
    world.server.requests.clear()
    out = poll(data)
    assert out.action == "failed" and "interrupted" in str(out.error)
    assert current(data) == good and world.server.bundle_requests() == []


def test_run_loop_polls_then_stops(world: World, data: Path) -> None:
    import threading

    from device_agent import loop

    world.publish("1.0.0", 2.0)
    agent = Agent(config.load(data))
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(agent,), kwargs={"stop": stop, "seed": 1})
    thread.start()
    deadline = time.monotonic() + 20
    while current(data) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join(10)
    assert not thread.is_alive() and current(data) is not None


def test_release_needing_a_newer_agent_is_refused(world: World, data: Path) -> None:
    from edgepack import bundle
    from edgepack.signing import ProducerKeySigner
    from tests.agent._support import make_model_dir

    world.publish("1.0.0", 2.0)
    poll(data)
    src = world.base / "src-future"
    health = make_model_dir(src, 3.0)
    packed = bundle.pack(
        src,
        world.base / "bundles",
        name=MODEL,
        version="2.0.0",
        recipients=[world.fleet_key.public_key()],
        signer=ProducerKeySigner(world.producer_key),
        health=health,
        min_agent_version="99.0.0",
    ).path
    world.repo.promote("2.0.0", world.repo.add_bundle(packed, "2.0.0"))
    out = poll(data)
    assert out.action == "failed" and "99.0.0" in str(out.error)
    assert str(current(data)).startswith("1.0.0")


def test_device_outside_the_rollout_keeps_the_previous_release(world: World, data: Path) -> None:
    world.publish("1.0.0", 2.0)
    poll(data)
    world.publish("2.0.0", 3.0, promote=False)
    world.repo.promote("2.0.0", world.targets["2.0.0"], rollout=0.0)
    world.server.requests.clear()
    assert poll(data).action == "up-to-date"
    assert world.server.bundle_requests() == []
    world.repo.promote("2.0.0", world.targets["2.0.0"], rollout=100.0)
    assert poll(data).action == "installed"


def test_bundle_for_another_architecture_is_refused(world: World, data: Path) -> None:
    from device_agent.selection import machine_architecture
    from edgepack import bundle
    from edgepack.signing import ProducerKeySigner
    from tests.agent._support import make_model_dir

    other = "aarch64" if machine_architecture() == "x86_64" else "x86_64"
    src = world.base / "src-other-arch"
    health = make_model_dir(src, 2.0)
    packed = bundle.pack(
        src,
        world.base / "bundles",
        name=MODEL,
        version="1.0.0",
        recipients=[world.fleet_key.public_key()],
        signer=ProducerKeySigner(world.producer_key),
        health=health,
        architectures=[other],
    ).path
    world.repo.promote("1.0.0", world.repo.add_bundle(packed, "1.0.0"))
    out = poll(data)
    assert out.action == "failed" and f"built for {other}" in str(out.error)
    assert current(data) is None


def test_a_server_dripping_its_headers_hits_the_response_deadline(
    world: World, tmp_path: Path
) -> None:
    """Each header byte arrives well within the read timeout, the head never ends."""
    d = tmp_path / "dev"
    world.enroll(d, fast_limits(read_timeout_s=1.0, response_timeout_s=2.0))
    world.publish("1.0.0", 2.0)
    assert poll(d).action == "installed"
    world.server.fault, world.server.fault_match, world.server.hang_s = (
        "drip-headers",
        "timestamp.json",
        30.0,
    )
    start = time.monotonic()
    out = poll(d)
    assert time.monotonic() - start < 10, "the poll waited on a dripping server"
    assert out.action == "kept" and not out.checked and "within 2 s" in str(out.error)
    assert status.load(d)["stale"] is True
    assert current(d) is not None


def test_installed_models_are_not_readable_by_other_users(world: World, data: Path) -> None:
    """The agent's user and its group (the applications) read a model; nobody else."""
    import stat as st

    world.publish("1.0.0", 2.0)
    assert poll(data).action == "installed"
    assert st.S_IMODE(data.stat().st_mode) == 0o750
    revision = Slots(data, MODEL).revision_dir(str(current(data)))
    entries = [revision, *revision.rglob("*")]
    assert len(entries) > 2
    for entry in entries:
        mode = st.S_IMODE(entry.lstat().st_mode)
        assert mode & 0o007 == 0, f"{entry} is {oct(mode)}: others can read it"
        assert mode & 0o222 == 0, f"{entry} is {oct(mode)}: writable once installed"
