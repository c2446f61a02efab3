"""Concurrent publishers and a reader polling during publishes."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import threading
from pathlib import Path

import pytest

from edgepack import channel as ch
from edgepack import repo
from edgepack.errors import ConflictError
from tests.repo.conftest import NOW, Producer, Repo, Server, make_bundle, new_client


def _publish_in_process(workdir: str, bundle: str, key: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    try:
        repo.publish(
            Path(workdir),
            [Path(bundle)],
            key=key,
            passphrase=repo.no_passphrase,
            now=NOW,
            channel="edge",
        )
        out.put("ok")
    except ConflictError as exc:
        out.put(f"conflict: {exc.diagnostics()}")


def test_two_publishers_at_once_both_land(digits_repo: Repo, producer: Producer) -> None:
    bundles = [
        make_bundle(digits_repo.bundles, producer, "digits", v, payload=os.urandom(200_000))
        for v in ("1.0.0", "2.0.0", "3.0.0")
    ]
    ctx = multiprocessing.get_context("fork")
    results: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
    procs = [
        ctx.Process(
            target=_publish_in_process,
            args=(str(digits_repo.workdir), str(b), str(digits_repo.team_private), results),
        )
        for b in bundles
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    outcomes = [results.get(timeout=5) for _ in procs]
    assert all(
        o == "ok" or o.startswith("conflict: another publish is in progress") for o in outcomes
    )
    status = repo.open_status(digits_repo.workdir, NOW)
    landed = set(status["models"][0]["releases"])
    # each process reports in its own order; count what landed against the "ok"s
    assert len(landed) == outcomes.count("ok")
    assert outcomes.count("ok") >= 1
    channel = status["channels"][0]
    assert channel["sequence"] == outcomes.count("ok")


def test_a_held_lock_gives_a_clear_retry_error(digits_repo: Repo, producer: Producer) -> None:
    bundle = make_bundle(digits_repo.bundles, producer, "digits", "1.0.0")
    fd = os.open(digits_repo.workdir / ".publish.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(ConflictError, match="another publish is in progress; retry"):
            digits_repo.publish(bundle, lock_wait=0.2)
    finally:
        os.close(fd)
    digits_repo.publish(bundle)  # the lock is free again


def test_a_reader_polling_during_publishes_never_sees_a_mixed_state(
    digits_repo: Repo, server: Server, producer: Producer, tmp_path: Path
) -> None:
    bundles = [
        make_bundle(digits_repo.bundles, producer, "digits", f"1.0.{i}", payload=os.urandom(50_000))
        for i in range(8)
    ]
    digits_repo.publish(bundles[0], channel="stable")
    done = threading.Event()
    seen: list[str] = []
    failures: list[BaseException] = []

    def poll() -> None:
        while True:
            last_round = done.is_set()  # one more poll after the publishes end
            try:
                # one device polling again and again, trusting what it cached
                device = new_client(server, tmp_path / "poller")
                info = device.get_targetinfo("channels/digits/stable.json")
                assert info is not None
                doc = ch.parse_channel(Path(device.download_target(info)).read_bytes())
                sel = ch.select_release(doc, device_id="d", profile=None, architecture="aarch64")
                assert sel.variant is not None
                target = device.get_targetinfo(sel.variant.target)
                assert target is not None
                device.download_target(target)
                seen.append(doc.current.version if doc.current else "")
            except BaseException as exc:  # any failure is the finding
                failures.append(exc)
                return
            if last_round:
                return

    reader = threading.Thread(target=poll)
    reader.start()
    for bundle in bundles[1:]:
        digits_repo.publish(bundle, channel="stable")
    done.set()
    reader.join(60)
    assert not reader.is_alive()
    assert failures == []
    assert len(seen) >= 2 and seen[-1] == "1.0.7"
    # versions only move forward
    order = [int(v.rsplit(".", 1)[1]) for v in seen]
    assert order == sorted(order)
