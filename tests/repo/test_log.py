"""``edgepack repo log``: the audit trail rebuilt from the signed metadata history.

A real repository goes through real publish, promote, rollout, rollback,
revoke, device revocation and key rotations (each a minute apart), then the
log is read back through the command line. Editing an old metadata file or a
channel document must show up as ``unverified`` and exit 4.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from edgepack import repo
from edgepack.cli import main
from edgepack.repo._envelopes import revoke_device
from tests.repo.conftest import NOW, Producer, forge, make_bundle, signer_from_pem, team_key

DEVICE = "dev-0123456789abcdef0123"


@dataclass
class History:
    """A repository after a known sequence of operations, and the key ids used."""

    workdir: Path
    team: str
    faces_team: str
    operators_old: str
    operators_new: str
    timestamp_old: str
    timestamp_new: str
    root: str


def _at(minutes: int) -> Any:
    return NOW + timedelta(minutes=minutes)


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory, producer: Producer) -> History:
    tmp = tmp_path_factory.mktemp("log")
    work = tmp / "repo"
    nop = repo.no_passphrase
    repo.init(work, passphrase=None, now=NOW)
    root_md = json.loads((work / "public/metadata/1.root.json").read_bytes())["signed"]
    private, public = team_key(tmp / "teams", "digits")
    team = repo.add_model(work, "digits", public, passphrase=nop, now=_at(1)).summary["keyid"]
    faces_private, faces_public = team_key(tmp / "teams", "faces")
    faces = repo.add_model(work, "faces", faces_public, passphrase=nop, now=_at(1))
    bundles = tmp / "bundles"
    bundles.mkdir()
    for i, version in enumerate(["1.0", "1.1"]):
        bundle = make_bundle(bundles, producer, "digits", version, profile="cpu")
        repo.publish(work, [bundle], key=str(private), passphrase=nop, now=_at(2 + i))
    faces_bundle = make_bundle(bundles, producer, "faces", "0.1")
    repo.publish(work, [faces_bundle], key=str(faces_private), passphrase=nop, now=_at(4))
    repo.promote(work, "digits", "1.0", channel="stable", passphrase=nop, now=_at(5))
    repo.promote(work, "digits", "1.1", channel="stable", rollout=10, passphrase=nop, now=_at(6))
    repo.promote(work, "digits", "1.1", channel="stable", rollout=50, passphrase=nop, now=_at(7))
    repo.rollback(work, "digits", channel="stable", passphrase=nop, now=_at(8))
    repo.revoke(work, "digits", "1.1", passphrase=nop, now=_at(9))
    ops = repo.rotate_key(work, "operators", passphrase=nop, new_passphrase=None, now=_at(10))
    ts = repo.rotate_key(work, "timestamp", passphrase=nop, new_passphrase=None, now=_at(11))
    revoke_device(work, DEVICE, reason="stolen", passphrase=nop, now=_at(12))
    return History(
        work,
        team,
        faces.summary["keyid"],
        _operators_key(work),
        ops.summary["keyids"][0],
        root_md["roles"]["timestamp"]["keyids"][0],
        ts.summary["keyids"][0],
        root_md["roles"]["root"]["keyids"][0],
    )


def _operators_key(work: Path) -> str:
    """The operators' first key id, as version 1 of top-level targets delegates it."""
    targets = json.loads((work / "public/metadata/1.targets.json").read_bytes())["signed"]
    keyid: str = targets["delegations"]["roles"][0]["keyids"][0]
    return keyid


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def log_json(capsys: pytest.CaptureFixture[str], workdir: Path, *args: str) -> list[Any]:
    code, out, err = run(capsys, "repo", "log", str(workdir), *args, "--json")
    assert code == 0, err
    entries: list[Any] = json.loads(out)
    return entries


def _find(entries: list[Any], action: str, **match: Any) -> list[Any]:
    return [
        e for e in entries if e["action"] == action and all(e[k] == v for k, v in match.items())
    ]


def test_every_action_with_role_key_and_versions(
    history: History, capsys: pytest.CaptureFixture[str]
) -> None:
    entries = log_json(capsys, history.workdir)
    publishes = _find(entries, "publish", model="digits")
    assert [(e["versions"], e["role"], e["keyids"]) for e in publishes] == [
        (["1.0"], "model-digits", [history.team]),
        (["1.1"], "model-digits", [history.team]),
    ]
    assert publishes[0]["time"] == "2026-11-28T12:02:00Z"
    assert "profile cpu" in publishes[0]["detail"]
    assert _find(entries, "publish", model="faces")[0]["keyids"] == [history.faces_team]

    old_ops = {"role": "operators", "keyids": [history.operators_old]}
    promotes = _find(entries, "promote", model="digits", channel="stable", **old_ops)
    assert [e["versions"] for e in promotes] == [["1.0"], ["1.0", "1.1"]]
    assert promotes[1]["time"] == "2026-11-28T12:06:00Z"
    rollout = _find(entries, "rollout", channel="stable", **old_ops)
    assert [(e["versions"], e["detail"]) for e in rollout] == [
        (["1.1"], "1.1 at 10% -> 1.1 at 50%")
    ]
    rollback = _find(entries, "rollback", channel="stable", **old_ops)
    assert [e["versions"] for e in rollback] == [["1.1", "1.0"]]
    revokes = _find(entries, "revoke", model="digits", **old_ops)
    assert sorted(e["channel"] for e in revokes) == ["beta", "candidate", "edge", "stable"]
    assert {tuple(e["versions"]) for e in revokes} == {("1.1",)}

    rotations = _find(entries, "key-rotation")
    ops_rotation = [e for e in rotations if e["role"] == "targets"]
    assert len(ops_rotation) == 1
    assert history.operators_old in ops_rotation[0]["detail"]
    assert history.operators_new in ops_rotation[0]["detail"]
    root_rotation = [e for e in rotations if e["role"] == "root"]
    assert [(e["role_version"], e["keyids"]) for e in root_rotation] == [(2, [history.root])]
    assert root_rotation[0]["detail"] == (
        f"timestamp keys {history.timestamp_old} -> {history.timestamp_new}"
    )

    device = _find(entries, "revoke-device")
    assert [(e["role"], e["keyids"], e["time"]) for e in device] == [
        ("envelopes", [history.operators_new], "2026-11-28T12:12:00Z")
    ]
    assert DEVICE in device[0]["detail"] and "stolen" in device[0]["detail"]

    times = [e["time"] for e in entries]
    assert times == sorted(times)
    assert not _find(entries, "unverified")


def test_model_filter_and_human_table(history: History, capsys: pytest.CaptureFixture[str]) -> None:
    faces = log_json(capsys, history.workdir, "--model", "faces")
    assert [(e["action"], e["versions"]) for e in faces] == [
        ("add-model", []),
        ("publish", ["0.1"]),
    ]
    digits = log_json(capsys, history.workdir, "--model", "digits")
    assert digits and all(e["model"] == "digits" for e in digits)
    code, out, _err = run(capsys, "repo", "log", str(history.workdir), "--model", "digits")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == len(digits)
    assert "rollback" in out and "digits/stable" in out and history.team[:12] in out


def _copy(history: History, tmp_path: Path) -> Path:
    work = tmp_path / "repo"
    shutil.copytree(history.workdir, work)
    return work


def test_edited_old_metadata_is_reported_and_exits_4(
    history: History, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = _copy(history, tmp_path)
    path = work / "public/metadata/3.operators.json"
    doc = json.loads(path.read_bytes())
    doc["signed"]["expires"] = "2030-01-01T00:00:00Z"
    path.write_text(json.dumps(doc))
    code, out, err = run(capsys, "repo", "log", str(work), "--json")
    assert code == 4
    assert "tampering detected: operators v3" in err and "Traceback" not in err
    entries = json.loads(out)
    bad = _find(entries, "unverified")
    assert [(e["role"], e["role_version"]) for e in bad] == [("operators", 3)]
    # what that version claims is not reported as if it were signed: the next
    # verified version is compared with the last verified one
    assert not [
        e
        for e in entries
        if e["role"] == "operators" and e["role_version"] == 3 and e is not bad[0]
    ]
    assert [e["role_version"] for e in _find(entries, "promote", channel="stable")] == [2, 4]


def test_edited_channel_document_is_reported(
    history: History, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = _copy(history, tmp_path)
    docs = sorted((work / "public/targets/channels/digits").glob("*.stable.json"))
    for doc in docs:
        doc.write_bytes(doc.read_bytes().replace(b'"rollout":50', b'"rollout":99'))
    code, out, _err = run(capsys, "repo", "log", str(work), "--json")
    assert code == 4
    assert any("does not match its signed hashes" in e["detail"] for e in json.loads(out))


def test_retired_key_signing_after_rotation_is_unverified(
    history: History, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The old operators' key signs a new version (claiming an early expiry-derived
    time): the snapshot serves it with the targets version that no longer trusts it."""
    work = _copy(history, tmp_path)
    old_key = signer_from_pem(work / "keys/retired/operators.key")
    assert old_key.public_key.keyid == history.operators_old
    forge(work, "operators", lambda md: None, [old_key])
    newest = max(
        int(p.name.split(".")[0]) for p in (work / "public/metadata").glob("*.operators.json")
    )
    code, out, err = run(capsys, "repo", "log", str(work), "--json")
    assert code == 4, err
    bad = _find(json.loads(out), "unverified")
    assert [(e["role"], e["role_version"]) for e in bad] == [("operators", newest)]


def test_hash_bins_moves_are_not_events(
    tmp_path: Path, producer: Producer, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "repo"
    repo.init(work, passphrase=None, now=NOW)
    settings = work / "repo.toml"
    settings.write_text(settings.read_text().replace("max_per_bin = 64", "max_per_bin = 1"))
    private, public = team_key(tmp_path / "teams", "digits")
    repo.add_model(work, "digits", public, passphrase=repo.no_passphrase, now=NOW)
    for i, version in enumerate(["1", "2", "3"]):
        bundle = make_bundle(tmp_path, producer, "digits", version)
        repo.publish(work, [bundle], key=str(private), passphrase=repo.no_passphrase, now=_at(i))
    assert list((work / "public/metadata").glob("*.model-digits~bin-*.json"))
    entries = log_json(capsys, work, "--model", "digits")
    assert [(e["action"], e["versions"]) for e in entries if e["action"] != "add-model"] == [
        ("publish", ["1"]),
        ("publish", ["2"]),
        ("publish", ["3"]),
    ]
    assert any(e["role"].startswith("model-digits~bin-") for e in entries)


def test_not_a_repository_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "repo", "log", str(tmp_path))
    assert code == 3
    assert out == "" and len(err.strip().splitlines()) == 1 and "not an edgepack repository" in err
