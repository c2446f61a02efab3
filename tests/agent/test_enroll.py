"""Enrolment refuses what the agent could never use, keeps what was set by hand when it is
run again, and a failure that was the device's own configuration can be cleared: by
re-enrolling with the right key, or with ``edgepack-agent retry NAME``."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from device_agent import config, enroll
from device_agent.slots import Slots
from edgepack import keys
from tests.agent._support import MODEL, World, fast_limits, run_agent
from tests.agent.conftest import poll

REPO = Path(__file__).resolve().parents[2]


def _agent(*args: str) -> subprocess.CompletedProcess[str]:
    return run_agent(*args)


def _enroll_args(world: World, data: Path, *extra: str) -> list[str]:
    return [
        "enroll",
        "--root",
        str(world.root_json),
        "--model",
        MODEL,
        "--trust",
        str(world.producer_pub),
        "--data-dir",
        str(data),
        *extra,
    ]


def _enroll(world: World, data: Path, recipient_key: Path | None) -> enroll.Enrolment:
    return enroll.enroll(
        data,
        repo_url=world.server.url,
        root=world.root_json,
        models=[MODEL],
        trust=world.producer_pub,
        recipient_key=recipient_key,
        limits=fast_limits(),
    )


@pytest.mark.parametrize(
    "extra",
    [
        ["--repo-url", "htp:/typo"],
        ["--repo-url", "htp://typo.example"],
        ["--repo-url", "ftp://mirror.example/edgepack"],
        ["--repo-url", "http:///no-host"],
        ["--repo-url", "https://host:port/"],
        ["--repo-url", "/no/such/copy"],
        ["--repo-url", "http://127.0.0.1:1", "--channel", "prod"],
        ["--repo-url", "http://127.0.0.1:1", "--model", "Digits_Bad"],
    ],
)
def test_enrolment_refuses_what_the_agent_could_never_use(
    world: World, tmp_path: Path, extra: list[str]
) -> None:
    data = tmp_path / "dev"
    out = _agent(*_enroll_args(world, data, *extra))
    assert out.returncode == 3, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert not data.exists()  # refused before anything was written


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:1", "https://repo.example/edgepack/", "file:///media/usb/public"]
)
def test_enrolment_takes_http_https_and_file_urls(world: World, tmp_path: Path, url: str) -> None:
    data = tmp_path / "dev"
    out = _agent(*_enroll_args(world, data, "--repo-url", url))
    assert out.returncode == 0, out.stderr
    assert config.load(data).metadata_url == url.rstrip("/") + "/metadata/"


def test_enrolment_takes_an_existing_directory(world: World, tmp_path: Path) -> None:
    data = tmp_path / "dev"
    copy = world.base / "public"
    out = _agent(*_enroll_args(world, data, "--repo-url", str(copy)))
    assert out.returncode == 0, out.stderr
    assert config.load(data).metadata_url == copy.as_uri() + "/metadata/"


def test_reenrolling_keeps_hand_set_limits_unless_new_ones_are_given(
    world: World, tmp_path: Path
) -> None:
    data = tmp_path / "dev"
    _enroll(world, data, world.fleet_key_path)
    cfg = config.load(data)
    cfg.limits.poll_interval_s = 42.0
    cfg.limits.keep_revisions = 4
    cfg.architecture = "aarch64"  # set by hand, no enrolment option sets it
    config.save(cfg)
    out = _agent(*_enroll_args(world, data, "--repo-url", world.server.url, "--channel", "beta"))
    assert out.returncode == 0, out.stderr
    again = config.load(data)
    assert again.channel == "beta"
    assert (again.limits.poll_interval_s, again.limits.keep_revisions) == (42.0, 4)
    assert again.architecture == "aarch64" and again.device_id == cfg.device_id
    _enroll(world, data, world.fleet_key_path)  # limits given: they replace the old ones
    assert config.load(data).limits == fast_limits()


def test_a_release_for_another_key_waits_for_the_right_key_without_downloading_it(
    world: World, tmp_path: Path
) -> None:
    data = tmp_path / "dev"
    bundle = world.publish("1.0.0", 2.0, pad_bytes=1024 * 1024)  # encrypted for the fleet key
    _enroll(world, data, None)  # the device's own key: not a recipient, and no envelope
    for _ in range(2):  # not marked failed: an envelope may be published later
        first = poll(data)
        assert first.action == "error" and "no key envelope" in str(first.error)
        assert Slots(data, MODEL).current() is None
    parts = list((data / "downloads").glob("*.part"))
    assert parts and all(p.stat().st_size < bundle.stat().st_size // 4 for p in parts)
    result = _enroll(world, data, world.fleet_key_path)
    assert result.cleared == ()  # there was no failure mark to clear
    installed = poll(data)
    assert installed.action == "installed" and installed.version == "1.0.0"


def test_reenrolling_with_the_right_trust_clears_the_failure_it_caused(
    world: World, tmp_path: Path
) -> None:
    data = tmp_path / "dev"
    world.publish("1.0.0", 2.0)
    other = keys.generate_signing_key()
    keys.write_keypair(world.base / "other-producer", other)
    _enroll(world, data, world.fleet_key_path)
    config.save(replace(config.load(data), trust_policy=str(world.base / "other-producer.pub")))
    first = poll(data)
    assert first.action == "failed" and "not signed by a producer" in str(first.error)
    assert poll(data).action == "kept"  # those bytes are not tried again ...
    result = _enroll(world, data, world.fleet_key_path)  # --trust: the right producer again
    assert result.cleared and result.cleared[0].startswith(f"{MODEL}: sha256:")
    installed = poll(data)  # ... until the device's configuration changed
    assert installed.action == "installed" and installed.version == "1.0.0"
    # Re-enrolling with nothing changed forgets nothing.
    assert _enroll(world, data, world.fleet_key_path).cleared == ()


def test_retry_forgets_a_failure_and_leaves_the_running_model(world: World, tmp_path: Path) -> None:
    data = tmp_path / "dev"
    world.publish("1.0.0", 2.0)
    _enroll(world, data, world.fleet_key_path)
    assert poll(data).action == "installed"
    running = Slots(data, MODEL).current()
    # 2.0.0 is signed by a producer key this device does not trust (yet).
    producer, other = world.producer_key, keys.generate_signing_key()
    world.producer_key = other
    world.publish("2.0.0", 3.0)
    world.producer_key = producer
    assert poll(data).action == "failed"
    kept = poll(data)
    assert kept.action == "kept" and "failed here before" in str(kept.error)
    assert f"edgepack-agent retry {MODEL}" in str(kept.error)  # the way out, said where it is met
    # The device's trust is mended by hand (the new producer key put into DATA): still kept.
    keys.write_keypair(world.base / "other-producer", other)
    trust = Path(config.load(data).trust_policy)
    trust.chmod(0o644)
    trust.write_bytes((world.base / "other-producer.pub").read_bytes())
    assert poll(data).action == "kept"

    out = _agent("retry", MODEL, "--data-dir", str(data), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["cleared"][0].startswith("sha256:")
    assert Slots(data, MODEL).current() == running  # retry does not touch what runs
    installed = poll(data)
    assert installed.action == "installed" and installed.version == "2.0.0"

    again = _agent("retry", MODEL, "--data-dir", str(data))
    assert again.returncode == 0 and "no release had failed here" in again.stdout
    unknown = _agent("retry", "other-model", "--data-dir", str(data))
    assert unknown.returncode == 3 and "not a model this device follows" in unknown.stderr


def test_a_recipient_key_that_cannot_be_opened_is_refused_before_anything_is_written(
    world: World, tmp_path: Path
) -> None:
    locked = world.base / "fleet-locked"
    keys.write_keypair(locked, world.fleet_key, b"fleet secret")
    signing = world.base / "producer.key"  # a key, but not a recipient key
    for key in (locked.with_suffix(".key"), signing):
        data = tmp_path / key.stem
        args = _enroll_args(world, data, "--repo-url", world.server.url)
        out = _agent(*args, "--recipient-key", str(key))
        assert out.returncode == 5, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
        assert not data.exists()
