"""Hash bins: a model role that grows is split into succinct bins devices walk into."""

from __future__ import annotations

import re
from pathlib import Path

from edgepack import repo
from edgepack.repo._tuf import Metadata, Snapshot, Targets, Timestamp
from tests.repo.conftest import NOW, Producer, Repo, Server, make_bundle, new_client


def _set_max_per_bin(workdir: Path, value: int) -> None:
    settings = workdir / "repo.toml"
    text = re.sub(r"max_per_bin = \d+", f"max_per_bin = {value}", settings.read_text())
    settings.write_text(text)


def _served(workdir: Path, role: str) -> Metadata[Targets]:
    meta = workdir / "public/metadata"
    ts = Metadata[Timestamp].from_bytes((meta / "timestamp.json").read_bytes())
    snap = Metadata[Snapshot].from_bytes(
        (meta / f"{ts.signed.snapshot_meta.version}.snapshot.json").read_bytes()
    )
    version = snap.signed.meta[f"{role}.json"].version
    return Metadata[Targets].from_bytes((meta / f"{version}.{role}.json").read_bytes())


def test_a_growing_model_moves_into_hash_bins(
    digits_repo: Repo, server: Server, producer: Producer, tmp_path: Path
) -> None:
    _set_max_per_bin(digits_repo.workdir, 4)
    versions = [f"1.{i}.0" for i in range(18)]
    bundles = [make_bundle(digits_repo.bundles, producer, "digits", v) for v in versions]
    for bundle in bundles[:4]:
        digits_repo.publish(bundle)
    flat = _served(digits_repo.workdir, "model-digits")
    assert len(flat.signed.targets) == 4 and flat.signed.delegations is None

    digits_repo.publish(bundles[4])  # the fifth release splits the role
    top = _served(digits_repo.workdir, "model-digits")
    assert top.signed.targets == {}
    assert top.signed.delegations is not None
    succinct = top.signed.delegations.succinct_roles
    assert succinct is not None and succinct.number_of_bins >= 2
    first_bins = succinct.number_of_bins

    digits_repo.publish(*bundles[5:])  # batch publish, re-binning again as needed
    status = repo.open_status(digits_repo.workdir, NOW)
    assert sorted(status["models"][0]["releases"]) == sorted(versions)
    assert status["models"][0]["bins"] >= first_bins
    top = _served(digits_repo.workdir, "model-digits")
    assert top.signed.delegations is not None and top.signed.delegations.succinct_roles
    for name in top.signed.delegations.succinct_roles.get_roles():
        assert len(_served(digits_repo.workdir, name).signed.targets) <= 8

    repo.promote(
        digits_repo.workdir,
        "digits",
        "1.7.0",
        channel="stable",
        passphrase=repo.no_passphrase,
        now=NOW,
    )
    device = new_client(server, tmp_path / "dev")
    for version, bundle in zip(versions, bundles, strict=True):
        info = device.get_targetinfo(f"models/digits/digits-{version}-any.epk")
        assert info is not None, version
        assert info.length == bundle.stat().st_size
    fresh = new_client(server, tmp_path / "fresh")
    info = fresh.get_targetinfo("models/digits/digits-1.7.0-any.epk")
    assert info is not None
    assert Path(fresh.download_target(info)).read_bytes() == bundles[7].read_bytes()
    # a device fetches the one bin holding the release it wants, not every bin
    cached = {p.name for p in (tmp_path / "fresh/metadata").iterdir()}
    assert len({n for n in cached if "~bin-" in n}) == 1


def test_a_device_that_saw_the_old_bins_follows_a_rebin_across_a_name_width(
    digits_repo: Repo, server: Server, producer: Producer, tmp_path: Path
) -> None:
    """16 bins (names 0-f) grow to 32 (names 00-1f): the old names stay listed in the
    snapshot, so a device holding the old snapshot accepts the new one (TUF refuses a
    snapshot that drops a role the previous one listed)."""
    _set_max_per_bin(digits_repo.workdir, 1)
    versions = [f"1.{i}.0" for i in range(5)]
    digits_repo.publish(
        *(make_bundle(digits_repo.bundles, producer, "digits", v) for v in versions)
    )
    top = _served(digits_repo.workdir, "model-digits")
    assert top.signed.delegations and top.signed.delegations.succinct_roles
    assert top.signed.delegations.succinct_roles.number_of_bins == 16
    device = new_client(server, tmp_path / "dev")
    assert device.get_targetinfo("models/digits/digits-1.0.0-any.epk") is not None
    bins = 16
    while bins == 16 and len(versions) < 40:  # until a bin overflows and the role re-bins
        versions.append(f"1.{len(versions)}.0")
        digits_repo.publish(make_bundle(digits_repo.bundles, producer, "digits", versions[-1]))
        top = _served(digits_repo.workdir, "model-digits")
        assert top.signed.delegations and top.signed.delegations.succinct_roles
        bins = top.signed.delegations.succinct_roles.number_of_bins
    assert bins >= 32
    again = new_client(server, tmp_path / "dev")  # the same metadata folder, refreshed
    for version in versions:
        assert again.get_targetinfo(f"models/digits/digits-{version}-any.epk") is not None
