"""The stream check: a bundle's key, tags and file digests checked while it downloads."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_agent.slots import Slots
from device_agent.streamcheck import KeyProvider, NoKeyError, StreamCheck
from edgepack import bundle
from edgepack.bundle.metadata import EncryptionHeader, hpke_info
from edgepack.crypto import unwrap_key
from tests.agent._support import MODEL, World
from tests.agent.conftest import poll


def _provider(world: World, version: str) -> KeyProvider:
    def provide(header: EncryptionHeader) -> bytes:
        info = hpke_info(MODEL, version, None, header)
        return unwrap_key(list(header.recipients), world.fleet_key, info)

    return provide


def _feed(check: StreamCheck, data: bytes, chunk: int) -> None:
    for i in range(0, len(data), chunk):
        check.update(data[i : i + chunk])


@pytest.mark.parametrize("chunk", [511, 4096, 1024 * 1024 + 3, 8 * 1024 * 1024])
def test_digests_and_tags_are_checked_whatever_the_chunking(world: World, chunk: int) -> None:
    path = world.make_bundle("1.0.0", 2.0, pad_bytes=3 * 1024 * 1024)
    info = bundle.read_info(path)
    check = StreamCheck(_provider(world, "1.0.0"), [(f.path, f.size) for f in info.manifest])
    _feed(check, path.read_bytes(), chunk)
    assert check.payload_checked and check.problem is None
    assert check.digests == {f.path: f.sha256 for f in info.manifest}


def test_a_flipped_payload_byte_is_named_by_its_segment(world: World) -> None:
    path = world.make_bundle("1.0.0", 2.0, pad_bytes=3 * 1024 * 1024)
    info = bundle.read_info(path)
    raw = bytearray(path.read_bytes())
    raw[info.payload_offset + 2 * (1024 * 1024 + 16) + 10] ^= 0x01  # inside the third segment
    check = StreamCheck(_provider(world, "1.0.0"))
    _feed(check, bytes(raw), 65536)
    assert not check.payload_checked
    assert check.problem == "segment 2 of payload.enc fails authentication"


def test_sizes_that_do_not_add_up_are_a_problem_not_a_crash(world: World) -> None:
    path = world.make_bundle("1.0.0", 2.0)
    info = bundle.read_info(path)
    files = [(f.path, f.size + 1) for f in info.manifest]
    check = StreamCheck(_provider(world, "1.0.0"), files)
    _feed(check, path.read_bytes(), 4096)
    assert check.problem is not None and "does not match the files" in check.problem


def test_no_key_stops_the_stream_at_the_header(world: World) -> None:
    path = world.make_bundle("1.0.0", 2.0, pad_bytes=1024 * 1024)
    seen = 0

    def no_key(header: EncryptionHeader) -> bytes:
        raise NoKeyError("no key for this device")

    check = StreamCheck(no_key)
    data = path.read_bytes()
    with pytest.raises(NoKeyError):
        for i in range(0, len(data), 4096):
            seen = i + 4096
            check.update(data[i : i + 4096])
    assert seen <= 8192  # the encryption header is the first member


def test_a_published_bundle_whose_segments_fail_is_refused_for_good(
    world: World, data: Path
) -> None:
    """The repository signed (TUF) bytes whose payload fails its tags: refused, not retried."""
    path = world.make_bundle("1.0.0", 2.0, pad_bytes=1024 * 1024)
    info = bundle.read_info(path)
    raw = bytearray(path.read_bytes())
    raw[info.payload_offset + 100] ^= 0x01
    path.write_bytes(bytes(raw))
    world.targets["1.0.0"] = world.repo.add_bundle(path, "1.0.0")
    world.repo.promote("1.0.0", world.targets["1.0.0"])
    out = poll(data)
    assert out.action == "failed" and "segment 0 of payload.enc fails authentication" in str(
        out.error
    )
    assert Slots(data, MODEL).current() is None
    assert poll(data).action == "kept"  # those bytes are not tried again
