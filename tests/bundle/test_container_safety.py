"""The reader refuses hostile containers and manifests before writing anything."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import pytest

from edgepack.bundle import PackResult, read_info, unpack
from edgepack.errors import BundleFormatError, InvalidInputError
from tests.bundle import surgery
from tests.bundle.conftest import Keys


def _assert_refused(data: bytes, tmp_path: Path, keys: Keys, match: str) -> None:
    path = tmp_path / "hostile.epk"
    path.write_bytes(data)
    dest = tmp_path / "staging"
    with pytest.raises(BundleFormatError, match=match):
        unpack(path, dest, recipient_key=keys.recipient, policy=keys.policy)
    assert not dest.exists()


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("/meta/bundle.json", "absolute path"),
        ("../meta/bundle.json", r"contains '\.\.'"),
        ("meta/../../etc/passwd", r"contains '\.\.'"),
        ("meta//bundle.json", "not a normalised"),
        ("hooks/install.sh", "unexpected container entry"),
    ],
)
def test_hostile_entry_names(
    bundle: PackResult, keys: Keys, tmp_path: Path, name: str, match: str
) -> None:
    members = surgery.split(bundle.path)
    members[2] = (name, members[2][1])
    _assert_refused(surgery.join(members), tmp_path, keys, match)


@pytest.mark.parametrize(
    ("kind", "what"),
    [
        (b"1", "hard link"),
        (b"2", "symbolic link"),
        (b"3", "character device"),
        (b"4", "block device"),
        (b"5", "directory"),
        (b"6", "FIFO"),
        (b"x", "PAX"),
    ],
)
def test_links_devices_and_extensions_are_refused(
    bundle: PackResult, keys: Keys, tmp_path: Path, kind: bytes, what: str
) -> None:
    members = surgery.split(bundle.path)
    _assert_refused(surgery.join(members, kinds={2: kind}), tmp_path, keys, what)


def test_duplicate_and_extra_entries(bundle: PackResult, keys: Keys, tmp_path: Path) -> None:
    members = surgery.split(bundle.path)
    _assert_refused(
        surgery.join([members[0], *members]), tmp_path, keys, "duplicate container entry"
    )
    _assert_refused(
        surgery.join([*members, ("extra.bin", b"x")]), tmp_path, keys, "too many container entries"
    )
    _assert_refused(surgery.join(members[:3]), tmp_path, keys, "is missing")
    _assert_refused(
        surgery.join([members[1], members[0], *members[2:]]), tmp_path, keys, "out of order"
    )


def test_oversize_declared_size_and_trailing_data(
    bundle: PackResult, keys: Keys, tmp_path: Path
) -> None:
    members = surgery.split(bundle.path)
    data = bytearray(surgery.join(members))
    data[0:512] = surgery.raw_header(members[0][0], 2**40)
    _assert_refused(bytes(data), tmp_path, keys, "oversize|truncated")
    _assert_refused(bundle.path.read_bytes() + b"appended", tmp_path, keys, "after the end")


def _edit_manifest(bundle: PackResult, change: Any) -> bytes:
    return surgery.edit_json(bundle.path, "meta/bundle.json", change).read_bytes()


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ("/etc/cron.d/evil", "absolute"),
        ("../../evil", r"'\.\.'"),
        ("health/../../evil", r"'\.\.'"),
        ("a\\b", "safe characters"),
        ("meta/bundle.json", "under meta/"),
    ],
)
def test_hostile_manifest_paths(
    bundle: PackResult, keys: Keys, tmp_path: Path, path: str, match: str
) -> None:
    def change(doc: dict[str, Any]) -> None:
        doc["payload"]["files"][1]["path"] = path

    _assert_refused(_edit_manifest(bundle, change), tmp_path, keys, match)


def test_manifest_links_duplicates_and_counts(
    bundle: PackResult, keys: Keys, tmp_path: Path
) -> None:
    def symlink(doc: dict[str, Any]) -> None:
        doc["payload"]["files"][1]["type"] = "symlink"

    def duplicate(doc: dict[str, Any]) -> None:
        doc["payload"]["files"][1]["path"] = doc["payload"]["files"][0]["path"]

    def conflict(doc: dict[str, Any]) -> None:
        doc["payload"]["files"][1]["path"] = "model.onnx/inner"

    def lie_about_size(doc: dict[str, Any]) -> None:
        doc["payload"]["size"] += 1

    _assert_refused(_edit_manifest(bundle, symlink), tmp_path, keys, "regular files only")
    _assert_refused(_edit_manifest(bundle, duplicate), tmp_path, keys, "duplicate payload entry")
    _assert_refused(_edit_manifest(bundle, conflict), tmp_path, keys, "conflicts")
    _assert_refused(_edit_manifest(bundle, lie_about_size), tmp_path, keys, "does not add up")


@pytest.mark.parametrize(
    "content",
    [b"", b"hello world\n", b"\x89PNG\r\n\x1a\n" + bytes(2000), bytes(4096)],
    ids=["empty", "text", "png", "zeros"],
)
def test_not_a_bundle_at_all(content: bytes, tmp_path: Path, keys: Keys) -> None:
    path = tmp_path / "x.epk"
    path.write_bytes(content)
    with pytest.raises(BundleFormatError):
        read_info(path)


def test_an_ordinary_tar_is_not_a_bundle(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        info = tarfile.TarInfo("readme.txt")
        info.size = 2
        archive.addfile(info, io.BytesIO(b"hi"))
    path = tmp_path / "plain.tar"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(BundleFormatError, match="unexpected container entry"):
        read_info(path)


def test_directory_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="not a regular file"):
        read_info(tmp_path)
    with pytest.raises(InvalidInputError, match="cannot read"):
        read_info(tmp_path / "missing.epk")


def _first_header_fixed(raw: bytearray) -> bytearray:
    """Recompute the first ustar header's checksum after an edit."""
    raw[148:156] = b" " * 8
    raw[148:156] = f"{sum(raw[:512]):06o}\0 ".encode()
    return raw


def test_the_ustar_prefix_field_is_refused_not_joined(bundle: PackResult, tmp_path: Path) -> None:
    raw = bytearray(bundle.path.read_bytes())
    raw[345:350] = b"evil\0"  # GNU tar reads "evil/meta/…"; the old reader joined it too
    hostile = tmp_path / "prefix.epk"
    hostile.write_bytes(_first_header_fixed(raw))
    with pytest.raises(BundleFormatError, match="prefix field"):
        read_info(hostile)


def test_non_zero_padding_after_a_member_is_refused(bundle: PackResult, tmp_path: Path) -> None:
    raw = bytearray(bundle.path.read_bytes())
    size = int(raw[124:136].rstrip(b"\0 "), 8)
    assert size % 512, "the first member must end inside a block for this test"
    raw[512 + size] = 0x41  # a byte of the first member's padding
    hostile = tmp_path / "padding.epk"
    hostile.write_bytes(bytes(raw))
    with pytest.raises(BundleFormatError, match="padding"):
        read_info(hostile)
