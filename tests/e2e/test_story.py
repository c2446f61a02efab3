"""The product's whole story, once behind ``edgepack repo serve`` and once behind nginx.

keys → build (intel-nuc, generic-x86_64; dynamic int8) → TUF repository →
serve → two devices install v1 and run it → a validly signed but broken v2
is refused by the health check and v1 stays → v2 revoked → v3 at a rollout
that takes exactly one device → operator rollback returns that device to v1
from its cache, with no download.
"""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edgepack.channel import rollout_bucket
from tests.e2e._support import (
    DEVICES,
    MODEL,
    PROFILES,
    Device,
    Releases,
    agent,
    assert_predicts,
    bundle_files,
    channel_document,
    edgepack,
    enroll,
    init_repository,
    poll,
    promote,
    publish,
    serve,
    status,
)


def split_rollout(devices: list[Device], version: str) -> tuple[float, Device, Device]:
    """A percentage whose rollout of ``version`` takes exactly one of two devices."""
    buckets = sorted((rollout_bucket(MODEL, version, d.device_id), d.name) for d in devices)
    (low, inside), (high, outside) = buckets
    assert low < high, f"both devices fall in bucket {low}; no percentage splits them"
    percent = round((low + high) / 2, 3)
    assert low < percent < high
    by_name = {d.name: d for d in devices}
    return percent, by_name[inside], by_name[outside]


def http_status(url: str) -> int:
    """The HTTP status of a GET of ``url``."""
    assert url.startswith("http://127.0.0.1:"), url
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback http
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def revision_fingerprint(device: Device, revision: str) -> tuple[int, int]:
    """Inode and mtime of an installed revision: unchanged means not reinstalled."""
    st = (device.model_dir / revision).stat()
    return st.st_ino, st.st_mtime_ns


@pytest.mark.parametrize(
    "server",
    [
        pytest.param("edgepack-repo-serve", id="edgepack-repo-serve"),
        pytest.param("nginx", id="nginx", marks=pytest.mark.nginx),
    ],
)
def test_story(server: str, releases: Releases, tmp_path: Path) -> None:
    keys = releases.keys
    workdir = tmp_path / "repo"
    public = workdir / "public"
    init_repository(workdir, keys, releases.v1)

    with serve(server, workdir) as url:
        # -- two devices enrol and install v1 ------------------------------------
        root_json = public / "metadata" / "1.root.json"
        devices = [
            enroll(name, tmp_path / name, profile, url, root_json, keys)
            for name, profile in zip(DEVICES, PROFILES, strict=True)
        ]
        assert devices[0].device_id != devices[1].device_id
        v1_rev: dict[str, str] = {}
        for device in devices:
            assert device.current() is None
            outcome = poll(device)
            assert outcome["action"] == "installed", outcome
            assert outcome["version"] == "1.0.0", outcome
            assert outcome["error"] is None, outcome
            revision = str(outcome["revision"])
            assert revision.startswith("1.0.0-"), outcome
            assert device.current() == revision
            assert device.installed() == [revision]
            v1_rev[device.name] = revision
            entry = status(device)
            assert entry["version"] == "1.0.0" and entry["revision"] == revision, entry
            assert_predicts(device, releases)
        # Each device took its own profile's variant: different bundles, different revisions.
        assert v1_rev[DEVICES[0]] != v1_rev[DEVICES[1]]

        # A poll with nothing new changes nothing.
        again = poll(devices[0])
        assert (again["action"], again["revision"]) == ("up-to-date", v1_rev[DEVICES[0]]), again

        # -- v2: validly signed, wrong outputs: the health check refuses it -----
        publish(workdir, keys, releases.v2_broken)
        doc = promote(workdir, "2.0.0")
        assert doc["current"]["version"] == "2.0.0", doc
        for device in devices:
            outcome = poll(device)
            assert outcome["action"] == "failed", outcome
            assert outcome["version"] == "2.0.0", outcome
            assert "health check" in str(outcome["error"]), outcome
            assert outcome["revision"] == v1_rev[device.name], outcome
            assert device.current() == v1_rev[device.name]
            assert device.installed() == [v1_rev[device.name]], "v2's revision was left behind"
            entry = status(device)
            assert entry["version"] == "1.0.0", entry
            assert "2.0.0" in entry["failed_releases"], entry
            assert_predicts(device, releases)

        # -- revoke v2: the channel falls back to v1 for everyone -----------------
        doc = channel_document(edgepack("revoke", MODEL, "2.0.0", "--repo", workdir))
        assert "2.0.0" in doc["revoked"], doc
        for device in devices:
            outcome = poll(device)
            # Without the revocation the channel still names v2: "kept", with an error.
            assert outcome["action"] == "up-to-date", outcome
            assert outcome["version"] == "1.0.0" and outcome["error"] is None, outcome
            assert device.current() == v1_rev[device.name]

        # -- v3 at a rollout that takes exactly one device --------------------------
        publish(workdir, keys, releases.v3)
        percent, inside, outside = split_rollout(devices, "3.0.0")
        doc = promote(workdir, "3.0.0", rollout=percent)
        assert doc["current"]["version"] == "3.0.0", doc
        assert doc["current"]["rollout"] == pytest.approx(percent), doc
        outcome = poll(inside)
        assert outcome["action"] == "installed" and outcome["version"] == "3.0.0", outcome
        v3_rev = str(outcome["revision"])
        assert v3_rev.startswith("3.0.0-") and inside.current() == v3_rev
        assert set(inside.installed()) == {v1_rev[inside.name], v3_rev}, "v1 must stay cached"
        assert_predicts(inside, releases)
        outcome = poll(outside)
        assert (outcome["action"], outcome["version"]) == ("up-to-date", "1.0.0"), outcome
        assert outside.current() == v1_rev[outside.name]
        assert outside.installed() == [v1_rev[outside.name]]

        # -- operator rollback: back to v1 from the device's cache -----------------
        downloads_before = sorted(p.name for p in inside.downloads.iterdir())
        v1_before = revision_fingerprint(inside, v1_rev[inside.name])
        # Take v1's bytes off the server: a device that tried to download them would fail.
        hidden = tmp_path / "hidden-v1"
        hidden.mkdir()
        v1_files = bundle_files(public, "1.0.0")
        assert len(v1_files) >= len(PROFILES), v1_files
        for path in v1_files:
            shutil.move(path, hidden / path.name)
            assert http_status(f"{url}/{path.relative_to(public)}") == 404

        doc = channel_document(
            edgepack("rollback", MODEL, "--repo", workdir, "--channel", "stable", "--to", "1.0.0")
        )
        assert doc["current"]["version"] == "1.0.0", doc
        outcome = poll(inside)
        assert outcome["action"] == "rolled-back", outcome
        assert outcome["version"] == "1.0.0" and outcome["error"] is None, outcome
        assert outcome["revision"] == v1_rev[inside.name], outcome
        assert inside.current() == v1_rev[inside.name]
        assert revision_fingerprint(inside, v1_rev[inside.name]) == v1_before, "reinstalled"
        assert sorted(p.name for p in inside.downloads.iterdir()) == downloads_before
        assert status(inside)["version"] == "1.0.0"
        assert_predicts(inside, releases)
        outcome = poll(outside)
        assert (outcome["action"], outcome["revision"]) == ("up-to-date", v1_rev[outside.name])

        listed = agent("list", MODEL, "--data-dir", inside.data)[MODEL]
        active = [r["revision"] for r in listed if r["active"]]
        assert active == [v1_rev[inside.name]], listed
