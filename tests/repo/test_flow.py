"""Publish, promote, roll back, revoke, refresh and status, seen by a real ngclient device."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from tuf.api.exceptions import ExpiredMetadataError
from tuf.ngclient.updater import Updater

from edgepack import channel as ch
from edgepack import repo
from edgepack.bundle import read_info
from tests.repo.conftest import (
    NOW,
    Producer,
    Repo,
    Server,
    make_bundle,
    new_client,
)


def fetch_channel(updater: Updater, model: str, channel: str) -> ch.ChannelDocument:
    """What an agent does: refresh (once), find the channel document, download, parse."""
    info = updater.get_targetinfo(ch.channel_target_path(model, channel))
    assert info is not None
    path = updater.download_target(info)
    return ch.parse_channel(Path(path).read_bytes())


def download(updater: Updater, target: str) -> bytes:
    info = updater.get_targetinfo(target)
    assert info is not None, f"{target} is not a trusted target"
    return Path(updater.download_target(info)).read_bytes()


def test_publish_promote_and_a_device_installs(
    digits_repo: Repo, server: Server, producer: Producer, tmp_path: Path
) -> None:
    pi = make_bundle(digits_repo.bundles, producer, "digits", "1.0.0", "raspberry-pi-4")
    nuc = make_bundle(digits_repo.bundles, producer, "digits", "1.0.0", "intel-nuc", ("x86_64",))
    result = digits_repo.publish(pi, nuc, channel="stable")
    assert sorted(result.summary["targets"]) == [
        "models/digits/digits-1.0.0-intel-nuc.epk",
        "models/digits/digits-1.0.0-raspberry-pi-4.epk",
    ]
    device = new_client(server, tmp_path / "dev")
    doc = fetch_channel(device, "digits", "stable")
    sel = ch.select_release(
        doc, device_id="pi-1", profile="raspberry-pi-4", architecture="aarch64", cohort=None
    )
    assert sel.ok and sel.version == "1.0.0" and sel.variant is not None
    data = download(device, sel.variant.target)
    assert data == pi.read_bytes()
    # target custom metadata carries what the agent needs before downloading
    info = device.get_targetinfo(sel.variant.target)
    assert info is not None
    assert info.custom == {
        "name": "digits",
        "version": "1.0.0",
        "profile": "raspberry-pi-4",
        "architectures": ["aarch64"],
        # the payload's files, so a device hashes each while it downloads
        "payload": [{"path": f.path, "size": f.size} for f in read_info(pi).manifest],
    }
    # the downloaded bytes are the very bundle that was packed
    downloaded = Path(device.download_target(info))
    assert read_info(downloaded).version == "1.0.0"


def test_staged_rollout_rollback_and_revoke(
    digits_repo: Repo, server: Server, producer: Producer, tmp_path: Path
) -> None:
    for version in ("1.0.0", "2.0.0", "3.0.0"):
        digits_repo.publish(make_bundle(digits_repo.bundles, producer, "digits", version))
    kw = {"passphrase": repo.no_passphrase, "now": NOW}
    repo.promote(digits_repo.workdir, "digits", "1.0.0", channel="stable", **kw)  # type: ignore[arg-type]
    repo.promote(
        digits_repo.workdir,
        "digits",
        "2.0.0",
        channel="stable",
        rollout=30,
        **kw,  # type: ignore[arg-type]
    )
    device = new_client(server, tmp_path / "d1")
    doc = fetch_channel(device, "digits", "stable")
    assert doc.sequence == 2 and doc.current is not None and doc.current.rollout == 30
    picks = {
        f"dev-{i}": ch.select_release(
            doc, device_id=f"dev-{i}", profile=None, architecture="aarch64"
        ).version
        for i in range(200)
    }
    share = sum(v == "2.0.0" for v in picks.values()) / len(picks)
    assert 0.15 < share < 0.45 and set(picks.values()) == {"1.0.0", "2.0.0"}

    repo.promote(
        digits_repo.workdir,
        "digits",
        "3.0.0",
        channel="stable",
        cohorts=["lab"],
        **kw,  # type: ignore[arg-type]
    )
    back = repo.rollback(digits_repo.workdir, "digits", channel="stable", **kw)  # type: ignore[arg-type]
    assert back.summary["documents"][0]["current"]["version"] == "2.0.0"
    doc = fetch_channel(new_client(server, tmp_path / "d2"), "digits", "stable")
    assert doc.sequence == 4  # a forward move: the sequence still grows
    assert doc.current is not None and doc.current.version == "2.0.0"
    assert doc.current.rollout == 100
    assert [r.version for r in doc.previous] == ["3.0.0", "1.0.0"]

    repo.revoke(digits_repo.workdir, "digits", "2.0.0", **kw)  # type: ignore[arg-type]
    device = new_client(server, tmp_path / "d3")
    for channel in ch.CHANNELS:  # every channel lists the revoked version
        assert "2.0.0" in fetch_channel(device, "digits", channel).revoked
    doc = fetch_channel(device, "digits", "stable")
    sel = ch.select_release(doc, device_id="any", profile=None, architecture="aarch64")
    assert sel.version == "1.0.0"  # never the revoked one
    with pytest.raises(Exception, match="revoked"):
        repo.promote(digits_repo.workdir, "digits", "2.0.0", channel="beta", **kw)  # type: ignore[arg-type]
    with pytest.raises(Exception, match="revoked"):
        repo.rollback(digits_repo.workdir, "digits", channel="stable", to_version="2.0.0", **kw)  # type: ignore[arg-type]


def test_refresh_is_quiet_until_due_then_keeps_devices_current(
    digits_repo: Repo, server: Server, tmp_path: Path
) -> None:
    kw = {"passphrase": repo.no_passphrase}
    assert repo.refresh(digits_repo.workdir, now=NOW + timedelta(hours=1), **kw).versions == {}  # type: ignore[arg-type]
    later = NOW + timedelta(hours=20)  # inside the timestamp's 12-hour window
    first = repo.refresh(digits_repo.workdir, now=later, **kw)  # type: ignore[arg-type]
    assert set(first.versions) == {"timestamp"}
    again = repo.refresh(digits_repo.workdir, now=later, **kw)  # type: ignore[arg-type]
    assert again.versions == {}  # idempotent
    much_later = NOW + timedelta(days=5)  # snapshot window too (timestamp long expired)
    device = new_client(server, tmp_path / "stale", when=much_later)
    with pytest.raises(ExpiredMetadataError):
        device.refresh()
    both = repo.refresh(digits_repo.workdir, now=much_later, **kw)  # type: ignore[arg-type]
    assert set(both.versions) == {"snapshot", "timestamp"}
    device = new_client(server, tmp_path / "fresh", when=much_later)
    device.refresh()


def test_status_reports_roles_models_channels_and_warns_early(
    digits_repo: Repo, producer: Producer
) -> None:
    digits_repo.publish(
        make_bundle(digits_repo.bundles, producer, "digits", "1.0.0"), channel="edge"
    )
    report = repo.open_status(digits_repo.workdir, NOW)
    assert report["warnings"] == []
    roles = {r["role"]: r for r in report["roles"]}
    assert set(roles) == {
        "root",
        "targets",
        "snapshot",
        "timestamp",
        "operators",
        "model-digits",
    }
    assert report["models"] == [
        {"name": "digits", "role": "model-digits", "bins": 0, "releases": {"1.0.0": ["any"]}}
    ]
    assert report["channels"][0]["current"]["version"] == "1.0.0"
    json.dumps(report)  # JSON-ready
    soon = repo.open_status(digits_repo.workdir, NOW + timedelta(days=340))
    warned = {w.split()[1] for w in soon["warnings"]}
    assert {"root", "targets", "operators", "model-digits", "timestamp", "snapshot"} <= warned
    assert {r["role"]: r["state"] for r in soon["roles"]}["root"] == "warning"


def test_resign_extends_roles_no_daily_work_touches(
    digits_repo: Repo, server: Server, producer: Producer, tmp_path: Path
) -> None:
    from edgepack.errors import KeyFileError

    digits_repo.publish(make_bundle(digits_repo.bundles, producer, "digits", "1.0.0"))
    later = NOW + timedelta(days=300)
    kw = {"passphrase": repo.no_passphrase, "now": later}
    for role in ("root", "targets", "operators"):
        assert role in repo.resign(digits_repo.workdir, role, **kw).versions  # type: ignore[arg-type]
    with pytest.raises(KeyFileError, match="needs the team's key"):
        repo.resign(digits_repo.workdir, "model-digits", **kw)  # type: ignore[arg-type]
    repo.resign(digits_repo.workdir, "model-digits", key=str(digits_repo.team_private), **kw)  # type: ignore[arg-type]
    report = repo.open_status(digits_repo.workdir, NOW + timedelta(days=400))
    assert {r["role"] for r in report["roles"] if r["state"] == "ok"} >= {
        "root",
        "targets",
        "operators",
        "model-digits",
    }
    device = new_client(server, tmp_path / "dev", when=NOW + timedelta(days=300, hours=1))
    assert device.get_targetinfo("models/digits/digits-1.0.0-any.epk") is not None
