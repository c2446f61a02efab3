"""Attacks on the served repository, each met by a real ngclient device over HTTP."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from tuf.api import exceptions as tuf_errors
from tuf.ngclient.config import UpdaterConfig

from edgepack import repo
from edgepack.repo._tuf import Metadata, Root, Timestamp
from tests.repo.conftest import (
    NOW,
    Producer,
    Repo,
    Server,
    make_bundle,
    new_client,
    signer_from_pem,
)


@pytest.fixture
def published(digits_repo: Repo, producer: Producer) -> Path:
    bundle = make_bundle(digits_repo.bundles, producer, "digits", "1.0.0")
    digits_repo.publish(bundle, channel="stable")
    return bundle


def _meta(server: Server) -> Path:
    return server.workdir / "public/metadata"


def test_substituted_bundle_is_refused(
    digits_repo: Repo, server: Server, published: Path, tmp_path: Path
) -> None:
    device = new_client(server, tmp_path / "dev")
    info = device.get_targetinfo("models/digits/digits-1.0.0-any.epk")
    assert info is not None
    served = server.workdir / "public/targets" / info.get_prefixed_paths()[0]
    data = bytearray(served.read_bytes())
    data[-10] ^= 0xFF  # same length, other bytes
    served.write_bytes(bytes(data))
    with pytest.raises(tuf_errors.LengthOrHashMismatchError):
        device.download_target(info)
    served.write_bytes(b"x" * 10)  # another file altogether
    with pytest.raises(tuf_errors.LengthOrHashMismatchError):
        device.download_target(info)


def test_replayed_old_metadata_is_refused(
    digits_repo: Repo, server: Server, published: Path, producer: Producer, tmp_path: Path
) -> None:
    old_timestamp = (_meta(server) / "timestamp.json").read_bytes()
    digits_repo.publish(make_bundle(digits_repo.bundles, producer, "digits", "2.0.0"))
    new_client(server, tmp_path / "dev").refresh()  # the device saw the new version
    (_meta(server) / "timestamp.json").write_bytes(old_timestamp)  # a mirror replays
    with pytest.raises(tuf_errors.BadVersionNumberError):
        new_client(server, tmp_path / "dev").refresh()


def test_frozen_metadata_is_refused_when_time_moves_on(
    digits_repo: Repo, server: Server, published: Path, tmp_path: Path
) -> None:
    new_client(server, tmp_path / "dev").refresh()
    # the mirror keeps serving the same files; two days later the timestamp has expired
    device = new_client(server, tmp_path / "dev", when=NOW + timedelta(days=2))
    with pytest.raises(tuf_errors.ExpiredMetadataError):
        device.refresh()


def test_mix_and_match_of_versions_is_refused(
    digits_repo: Repo, server: Server, published: Path, producer: Producer, tmp_path: Path
) -> None:
    meta = _meta(server)
    ts = Metadata[Timestamp].from_bytes((meta / "timestamp.json").read_bytes())
    old_snapshot_version = ts.signed.snapshot_meta.version
    old_snapshot = (meta / f"{old_snapshot_version}.snapshot.json").read_bytes()
    digits_repo.publish(make_bundle(digits_repo.bundles, producer, "digits", "2.0.0"))
    ts = Metadata[Timestamp].from_bytes((meta / "timestamp.json").read_bytes())
    current = meta / f"{ts.signed.snapshot_meta.version}.snapshot.json"
    genuine = current.read_bytes()
    current.write_bytes(old_snapshot)  # new timestamp, old snapshot under the new name
    with pytest.raises(tuf_errors.RepositoryError):
        new_client(server, tmp_path / "a").refresh()
    current.write_bytes(genuine)
    # new snapshot, old model role served under the new version's name
    role_v1 = (meta / "1.model-digits.json").read_bytes()
    (meta / "2.model-digits.json").write_bytes(role_v1)
    device = new_client(server, tmp_path / "b")
    with pytest.raises(tuf_errors.RepositoryError):
        device.get_targetinfo("models/digits/digits-2.0.0-any.epk")


def test_endless_data_is_cut_off(
    digits_repo: Repo, server: Server, published: Path, tmp_path: Path
) -> None:
    meta = _meta(server)
    ts = Metadata[Timestamp].from_bytes((meta / "timestamp.json").read_bytes())
    snapshot = meta / f"{ts.signed.snapshot_meta.version}.snapshot.json"
    genuine = snapshot.read_bytes()
    snapshot.write_bytes(genuine + b" " * 5_000_000)  # longer than the timestamp allows
    with pytest.raises(tuf_errors.DownloadLengthMismatchError):
        new_client(server, tmp_path / "a").refresh()
    snapshot.write_bytes(genuine)
    genuine_ts = (meta / "timestamp.json").read_bytes()
    (meta / "timestamp.json").write_bytes(genuine_ts + b" " * 100_000)
    small = UpdaterConfig(timestamp_max_length=16384)
    with pytest.raises(tuf_errors.DownloadLengthMismatchError):
        new_client(server, tmp_path / "b", config=small).refresh()
    (meta / "timestamp.json").write_bytes(genuine_ts)
    device = new_client(server, tmp_path / "c")
    info = device.get_targetinfo("models/digits/digits-1.0.0-any.epk")
    assert info is not None
    served = server.workdir / "public/targets" / info.get_prefixed_paths()[0]
    served.write_bytes(served.read_bytes() + b"\0" * 3_000_000)
    with pytest.raises(tuf_errors.DownloadLengthMismatchError):
        device.download_target(info)


def test_expired_metadata_is_refused(
    digits_repo: Repo, server: Server, published: Path, tmp_path: Path
) -> None:
    device = new_client(server, tmp_path / "dev", when=NOW + timedelta(days=400))
    with pytest.raises(tuf_errors.ExpiredMetadataError):
        device.refresh()


def test_compromised_timestamp_key_rotated_out(
    digits_repo: Repo, server: Server, published: Path, tmp_path: Path
) -> None:
    old_key = signer_from_pem(digits_repo.workdir / "keys/timestamp.key")
    new_client(server, tmp_path / "dev").refresh()
    repo.rotate_key(
        digits_repo.workdir,
        "timestamp",
        passphrase=repo.no_passphrase,
        new_passphrase=None,
        now=NOW,
    )
    assert (digits_repo.workdir / "keys/retired/timestamp.key").exists()
    new_client(server, tmp_path / "dev").refresh()  # follows root v2, accepts the new key
    # the thief signs a newer timestamp with the retired key
    meta = _meta(server)
    ts = Metadata[Timestamp].from_bytes((meta / "timestamp.json").read_bytes())
    ts.signed.version += 5
    ts.sign(old_key)
    (meta / "timestamp.json").write_bytes(ts.to_bytes())
    with pytest.raises(tuf_errors.UnsignedMetadataError):
        new_client(server, tmp_path / "dev").refresh()
    # a device enrolled with root v1 that never saw the rotation is safe too
    with pytest.raises(tuf_errors.UnsignedMetadataError):
        new_client(server, tmp_path / "late").refresh()


def test_root_rotation_follows_the_chain_and_drops_the_old_key(
    digits_repo: Repo, server: Server, published: Path, tmp_path: Path
) -> None:
    old_root = signer_from_pem(digits_repo.workdir / "keys/root.key")
    new_client(server, tmp_path / "dev").refresh()
    result = repo.rotate_key(
        digits_repo.workdir, "root", passphrase=repo.no_passphrase, new_passphrase=None, now=NOW
    )
    assert result.versions["root"] == 2
    two = Metadata[Root].from_bytes((_meta(server) / "2.root.json").read_bytes())
    assert len(two.signatures) == 2  # old key and new key: the chain holds
    device = new_client(server, tmp_path / "dev")
    device.refresh()
    assert device._trusted_set.root.version == 2
    # a root v3 signed only by the rotated-out key is refused
    forged = Metadata[Root].from_bytes((_meta(server) / "2.root.json").read_bytes())
    forged.signed.version = 3
    forged.sign(old_root)
    (_meta(server) / "3.root.json").write_bytes(forged.to_bytes())
    with pytest.raises(tuf_errors.UnsignedMetadataError):
        new_client(server, tmp_path / "dev").refresh()
    (_meta(server) / "3.root.json").unlink()
    # the repository keeps working with its new root key
    repo.promote(
        digits_repo.workdir,
        "digits",
        "1.0.0",
        channel="beta",
        passphrase=repo.no_passphrase,
        now=NOW,
    )
    late = new_client(server, tmp_path / "late")  # enrolled with root v1
    assert late.get_targetinfo("channels/digits/beta.json") is not None
    settings = (digits_repo.workdir / "repo.toml").read_text()
    assert "root-v2.key" in settings and json.dumps("keys/root.key") not in settings


def test_operators_key_rotation_drops_the_old_key(
    digits_repo: Repo, server: Server, published: Path, tmp_path: Path
) -> None:
    from edgepack.repo._tuf import TargetFile, Targets

    old = signer_from_pem(digits_repo.workdir / "keys/operators.key")
    repo.rotate_key(
        digits_repo.workdir,
        "operators",
        passphrase=repo.no_passphrase,
        new_passphrase=None,
        now=NOW,
    )
    assert new_client(server, tmp_path / "a").get_targetinfo("channels/digits/stable.json")
    from tests.repo.conftest import forge

    def mutate(md: Metadata[Targets]) -> None:
        md.signed.targets["channels/digits/beta.json"] = TargetFile.from_data(
            "channels/digits/beta.json", b"{}"
        )

    forge(digits_repo.workdir, "operators", mutate, [old])
    device = new_client(server, tmp_path / "b")
    with pytest.raises(tuf_errors.UnsignedMetadataError):
        device.get_targetinfo("channels/digits/beta.json")


def test_rotating_onto_a_signer_uri(
    digits_repo: Repo, server: Server, published: Path, tmp_path: Path
) -> None:
    """Moving snapshot onto an external signer (``file2:`` stands in for hsm:/…kms:)."""
    from edgepack.repo._keys import generate_role_key

    external = tmp_path / "hsm" / "snapshot.key"
    generate_role_key(external, None)
    uri = f"file2:{external}"
    repo.rotate_key(
        digits_repo.workdir,
        "snapshot",
        passphrase=repo.no_passphrase,
        new_passphrase=None,
        replacements=[(uri, Path(f"{external}.pub"))],
        now=NOW,
    )
    assert f'snapshot = ["{uri}"]' in (digits_repo.workdir / "repo.toml").read_text()
    # later commits open the URI from repo.toml
    repo.promote(
        digits_repo.workdir,
        "digits",
        "1.0.0",
        channel="beta",
        passphrase=repo.no_passphrase,
        now=NOW,
    )
    assert new_client(server, tmp_path / "dev").get_targetinfo("channels/digits/beta.json")
