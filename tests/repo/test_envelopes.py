"""Per-device key envelopes: ``edgepack keys wrap`` and ``fleet revoke-device --repo``.

A real repository, real bundles, devices enrolled by the real ``edgepack-agent
enroll`` code (their signed records and their own X25519 keys), the command line
in-process, and python-tuf's ngclient over HTTP on 127.0.0.1 as the device, with
a fetcher that records every URL it asks for.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519
from tuf.ngclient.updater import Updater
from tuf.ngclient.urllib3_fetcher import Urllib3Fetcher

from device_agent import enroll
from edgepack import envelope as env
from edgepack import keys, repo
from edgepack.bundle import read_info
from edgepack.bundle.metadata import hpke_info
from edgepack.cli import main
from edgepack.crypto import WrappedKey, unwrap_key
from edgepack.errors import BundleFormatError, InvalidInputError, VerificationError
from edgepack.repo import _envelopes
from tests.repo.conftest import Producer, make_bundle, team_key


class RecordingFetcher(Urllib3Fetcher):
    """ngclient's own fetcher, keeping every URL it fetches."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.urls.append(url)
        return super()._fetch(url)


@dataclass
class Site:
    """A served repository with one published release and enrolled devices."""

    workdir: Path
    url: str
    base: Path
    producer: Producer
    opener: Path
    team: Path
    bundle: Path
    devices: dict[str, x25519.X25519PrivateKey]
    records: Path

    def release(self, version: str) -> Path:
        path = make_bundle(self.base / "bundles", self.producer, "digits", version)
        repo.publish(self.workdir, [path], key=str(self.team), passphrase=repo.no_passphrase)
        return path

    def client(self, home: Path) -> tuple[Updater, RecordingFetcher]:
        (home / "metadata").mkdir(parents=True, exist_ok=True)
        (home / "targets").mkdir(exist_ok=True)
        root = self.workdir / "public/metadata/1.root.json"
        (home / "metadata/root.json").write_bytes(root.read_bytes())
        fetcher = RecordingFetcher()
        updater = Updater(
            metadata_dir=str(home / "metadata"),
            metadata_base_url=f"{self.url}/metadata/",
            target_base_url=f"{self.url}/targets/",
            target_dir=str(home / "targets"),
            fetcher=fetcher,
            bootstrap=None,
        )
        return updater, fetcher


def enrol_devices(base: Path, workdir: Path, count: int) -> dict[str, x25519.X25519PrivateKey]:
    """Enrol ``count`` devices (each with its own recipient key); copy their records to
    ``base/records``; return device id → recipient private key."""
    out = {}
    (base / "records").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        data = base / f"device-{i}"
        result = enroll.enroll(
            data,
            repo_url="http://127.0.0.1:9",
            root=workdir / "public/metadata/1.root.json",
            models=["digits"],
        )
        record = data / "keys" / "enrolment.json"
        (base / "records" / f"{result.device_id}.json").write_bytes(record.read_bytes())
        out[result.device_id] = keys.load_recipient_private_key(data / "keys" / "device.key")
    return out


@pytest.fixture
def site(tmp_path: Path, producer: Producer) -> Iterator[Site]:
    workdir = tmp_path / "repo"
    repo.init(workdir, passphrase=None)
    private, public = team_key(tmp_path / "teams", "digits")
    repo.add_model(workdir, "digits", public, passphrase=repo.no_passphrase)
    keys.write_recipient_keypair(tmp_path / "publisher", producer.fleet)
    devices = enrol_devices(tmp_path, workdir, 3)
    httpd = repo.make_server(workdir, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    s = Site(
        workdir,
        f"http://127.0.0.1:{httpd.server_address[1]}",
        tmp_path,
        producer,
        tmp_path / "publisher.key",
        private,
        Path(),
        devices,
        tmp_path / "records",
    )
    s.bundle = s.release("1.0.0")
    try:
        yield s
    finally:
        httpd.shutdown()
        httpd.server_close()


def holder_of(workdir: Path, path: str) -> str:
    """The bin a target path hashes into, by TUF's rule, from the served envelopes role."""
    from edgepack.repo._ops import open_store

    store = open_store(workdir, repo.no_passphrase, None)[2]
    delegations = store.role(_envelopes.ENVELOPES).signed.delegations
    assert delegations is not None and delegations.succinct_roles is not None
    return delegations.succinct_roles.get_role_for_target(path)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def wrap(
    capsys: pytest.CaptureFixture[str], site: Site, bundle: Path, *extra: str
) -> dict[str, Any]:
    code, out, err = run(
        capsys,
        "keys",
        "wrap",
        str(bundle),
        "--repo",
        str(site.workdir),
        "--open-with",
        str(site.opener),
        "--devices",
        str(site.records),
        "--json",
        *extra,
    )
    assert code == 0, err
    data: dict[str, Any] = json.loads(out)
    return data


def content_key(site: Site, bundle: Path) -> bytes:
    info = read_info(bundle)
    return unwrap_key(
        list(info.encryption.recipients),
        site.producer.fleet,
        hpke_info(info.name, info.version, info.profile, info.encryption),
    )


def open_envelope(data: bytes, bundle: Path, key: x25519.X25519PrivateKey) -> bytes:
    info = read_info(bundle)
    parsed = env.parse_envelope(data)
    return unwrap_key(
        [WrappedKey(parsed.key_id, parsed.sealed)],
        key,
        hpke_info(info.name, info.version, info.profile, info.encryption),
    )


def test_each_device_fetches_its_own_envelope_from_one_bin(
    site: Site, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    done = wrap(capsys, site, site.bundle)
    assert len(done["wrapped"]) == 3 and done["skipped"] == []
    assert done["bins"] == 2
    for device_id, key in site.devices.items():
        updater, fetcher = site.client(tmp_path / device_id)
        updater.refresh()
        path = env.envelope_target_path("digits", "1.0.0", device_id)
        info = updater.get_targetinfo(path)
        assert info is not None
        data = updater.download_target(info, str(tmp_path / device_id / "envelope.json"))
        envelope_bytes = Path(data).read_bytes()
        parsed = env.parse_envelope(envelope_bytes)
        assert (parsed.device_id, parsed.name, parsed.version) == (device_id, "digits", "1.0.0")
        assert open_envelope(envelope_bytes, site.bundle, key) == content_key(site, site.bundle)
        bins = [u for u in fetcher.urls if "envelopes~bin" in u]
        assert len(bins) == 1, bins
        assert bins[0].endswith(f".{holder_of(site.workdir, path)}.json")
        # another device's key does not open it
        other = next(k for d, k in site.devices.items() if d != device_id)
        with pytest.raises(VerificationError):
            open_envelope(envelope_bytes, site.bundle, other)


def test_wrapping_again_skips_devices_already_wrapped(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    wrap(capsys, site, site.bundle)
    again = wrap(capsys, site, site.bundle)
    assert again["wrapped"] == [] and again["versions"] == {}
    assert {s["reason"] for s in again["skipped"]} == {"already wrapped"}


def test_revoked_device_gets_no_envelope_and_is_never_wrapped_again(
    site: Site, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EDGEPACK_FLEET_DB", raising=False)
    monkeypatch.chdir(tmp_path)
    wrap(capsys, site, site.bundle)
    stolen, *kept = sorted(site.devices)
    code, out, err = run(
        capsys,
        "fleet",
        "revoke-device",
        stolen,
        "--repo",
        str(site.workdir),
        "--reason",
        "stolen",
        "--json",
    )
    assert code == 0, err
    revoked = json.loads(out)["repository"]
    assert revoked["withdrawn"] == [env.envelope_target_path("digits", "1.0.0", stolen)]
    assert not (tmp_path / "fleet.db").exists()  # --repo alone touches no fleet store
    listed = _envelopes.revoked_devices(site.workdir)
    assert listed[stolen].reason == "stolen"

    v2 = site.release("2.0.0")
    done = wrap(capsys, site, v2)
    assert sorted(done["wrapped"]) == sorted(
        env.envelope_target_path("digits", "2.0.0", d) for d in kept
    )
    skipped = done["skipped"]
    assert [s["device_id"] for s in skipped] == [stolen]
    assert "revoked" in skipped[0]["reason"] and "stolen" in skipped[0]["reason"]

    updater, _ = site.client(tmp_path / "stolen")
    updater.refresh()
    for version in ("1.0.0", "2.0.0"):
        assert updater.get_targetinfo(env.envelope_target_path("digits", version, stolen)) is None
    for device in kept:
        assert updater.get_targetinfo(env.envelope_target_path("digits", "2.0.0", device))
    info = updater.get_targetinfo(env.REVOKED_PATH)
    assert info is not None
    path = updater.download_target(info, str(tmp_path / "revoked.json"))
    assert set(env.parse_revoked(Path(path).read_bytes())) == {stolen}

    # the human output says which device was skipped and why
    code, out, _err = run(
        capsys,
        "keys",
        "wrap",
        str(v2),
        "--repo",
        str(site.workdir),
        "--open-with",
        str(site.opener),
        "--devices",
        str(site.records),
    )
    assert code == 0 and f"skipped {stolen}: revoked" in out

    # revoking twice changes nothing
    again = run(capsys, "fleet", "revoke-device", stolen, "--repo", str(site.workdir), "--json")
    assert again[0] == 0 and json.loads(again[1])["repository"]["versions"] == {}


def test_wrong_open_with_key_is_one_clear_error(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    keys.write_recipient_keypair(site.base / "stranger", keys.generate_recipient_key())
    before = sorted(p.name for p in (site.workdir / "public/metadata").iterdir())
    code, _out, err = run(
        capsys,
        "keys",
        "wrap",
        str(site.bundle),
        "--repo",
        str(site.workdir),
        "--open-with",
        str(site.base / "stranger.key"),
        "--devices",
        str(site.records),
    )
    assert code == 4
    assert len(err.strip().splitlines()) == 1 and "is not a recipient of" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in (site.workdir / "public/metadata").iterdir()) == before


def test_unpublished_bundle_is_refused(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    loose = make_bundle(site.base / "loose", site.producer, "digits", "9.0.0")
    code, _out, err = run(
        capsys,
        "keys",
        "wrap",
        str(loose),
        "--repo",
        str(site.workdir),
        "--open-with",
        str(site.opener),
        "--devices",
        str(site.records),
    )
    assert code == 3 and "is not published" in err and len(err.strip().splitlines()) == 1


def test_a_tampered_record_is_refused(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    victim = next(site.records.iterdir())
    record = json.loads(victim.read_bytes())
    record["recipient"] = "x25519:" + "ab" * 32
    victim.write_text(json.dumps(record))
    code, _out, err = run(
        capsys,
        "keys",
        "wrap",
        str(site.bundle),
        "--repo",
        str(site.workdir),
        "--open-with",
        str(site.opener),
        "--devices",
        str(site.records),
    )
    assert code == 3 and "signature does not verify" in err


def test_a_json_list_of_records_works(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    listing = site.base / "devices.json"
    listing.write_text(
        json.dumps([json.loads(p.read_bytes()) for p in sorted(site.records.iterdir())])
    )
    site.records = listing
    done = wrap(capsys, site, site.bundle)
    assert len(done["wrapped"]) == 3


def test_bins_grow_with_the_fleet_and_every_envelope_stays_found(
    site: Site, tmp_path: Path
) -> None:
    """600 in-process devices outgrow 2 bins: the role is re-binned to 4, nothing lost."""
    release = _envelopes.release_of(site.bundle, site.producer.fleet)
    fleet = [
        _envelopes.Device(f"dev-{i:020x}", x25519.X25519PrivateKey.generate().public_key())
        for i in range(600)
    ]
    first = _envelopes.wrap(site.workdir, [release], fleet[:100], passphrase=repo.no_passphrase)
    assert first.summary["bins"] == 2
    second = _envelopes.wrap(site.workdir, [release], fleet[100:], passphrase=repo.no_passphrase)
    assert second.summary["bins"] == 2 ** _envelopes.bits_for(600) == 4
    updater, fetcher = site.client(tmp_path / "late")
    updater.refresh()
    for device in (fleet[0], fleet[99], fleet[599]):
        assert updater.get_targetinfo(env.envelope_target_path("digits", "1.0.0", device.device_id))
    absent = env.envelope_target_path("digits", "1.0.0", "dev-" + "f" * 20)
    assert updater.get_targetinfo(absent) is None
    assert len({u for u in fetcher.urls if "envelopes~bin" in u}) <= 4


def test_envelopes_follow_a_rotated_operators_key(site: Site, tmp_path: Path) -> None:
    """`keys rotate operators` re-delegates and re-signs the envelopes role in its commit."""
    release = _envelopes.release_of(site.bundle, site.producer.fleet)
    first = _envelopes.Device("dev-" + "1" * 20, x25519.X25519PrivateKey.generate().public_key())
    _envelopes.wrap(site.workdir, [release], [first], passphrase=repo.no_passphrase)
    rotated = repo.rotate_key(
        site.workdir, "operators", passphrase=repo.no_passphrase, new_passphrase=None
    )
    assert {"envelopes", "envelopes~bin-0", "envelopes~bin-1"} <= set(rotated.versions)
    updater, _ = site.client(tmp_path / "after")
    updater.refresh()
    path = env.envelope_target_path("digits", "1.0.0", first.device_id)
    assert updater.get_targetinfo(path)
    second = _envelopes.Device("dev-" + "2" * 20, x25519.X25519PrivateKey.generate().public_key())
    _envelopes.wrap(site.workdir, [release], [second], passphrase=repo.no_passphrase)
    updater, _ = site.client(tmp_path / "later")
    updater.refresh()
    for device in (first, second):
        assert updater.get_targetinfo(env.envelope_target_path("digits", "1.0.0", device.device_id))


def test_envelope_documents_are_parsed_strictly() -> None:
    key = x25519.X25519PrivateKey.generate()
    good = env.make_envelope(
        b"k" * 32,
        key.public_key(),
        name="digits",
        version="1.0.0",
        profile=None,
        bundle_sha256="a" * 64,
        device_id="dev-" + "0" * 20,
        info=b"info",
    )
    data = good.to_bytes()
    assert env.parse_envelope(data) == good
    doc = json.loads(data)
    for change in (
        {"extra": 1},
        {"format_version": True},
        {"format_version": 2},
        {"device_id": "../../etc"},
        {"sealed": "!!"},
        {"sealed": "AAAA"},
        {"profile": 3},
    ):
        with pytest.raises(BundleFormatError):
            env.parse_envelope(json.dumps({**doc, **change}).encode())
    with pytest.raises(BundleFormatError, match="limit"):
        env.parse_envelope(b" " * (env.MAX_ENVELOPE_BYTES + 1))
    with pytest.raises(BundleFormatError):
        env.parse_envelope(data.replace(b'"digits"', b'"digits","name":"x"'))


def test_revocation_is_also_recorded_with_a_fleet_store(
    site: Site, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    record = next(site.records.iterdir())
    device_id = record.stem
    assert run(capsys, "fleet", "register", str(record), "--db", db)[0] == 0
    code, out, err = run(
        capsys, "fleet", "revoke-device", device_id, "--db", db, "--repo", str(site.workdir)
    )
    assert code == 0, err
    assert out.splitlines()[0] == f"revoked {device_id}"
    assert "listed" in out.splitlines()[1]
    assert device_id in _envelopes.revoked_devices(site.workdir)
    shown = run(capsys, "fleet", "show", device_id, "--db", db, "--json")
    assert json.loads(shown[1])["device"]["revoked_at"]


def test_refresh_role_envelopes_resigns_the_role_and_every_bin(site: Site, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="no key envelopes yet"):
        repo.resign(site.workdir, "envelopes", passphrase=repo.no_passphrase)
    release = _envelopes.release_of(site.bundle, site.producer.fleet)
    device = _envelopes.Device("dev-" + "3" * 20, x25519.X25519PrivateKey.generate().public_key())
    _envelopes.wrap(site.workdir, [release], [device], passphrase=repo.no_passphrase)
    done = repo.resign(site.workdir, "envelopes", passphrase=repo.no_passphrase)
    assert {"envelopes", "envelopes~bin-0", "envelopes~bin-1"} <= set(done.versions)
    updater, _ = site.client(tmp_path / "after")
    updater.refresh()
    assert updater.get_targetinfo(env.envelope_target_path("digits", "1.0.0", device.device_id))


def test_prune_withdraws_a_release_no_channel_offers(
    site: Site, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    v1 = _envelopes.release_of(site.bundle, site.producer.fleet)
    v2_bundle = site.release("2.0.0")
    v2 = _envelopes.release_of(v2_bundle, site.producer.fleet)
    fleet = [
        _envelopes.Device(f"dev-{i:020x}", x25519.X25519PrivateKey.generate().public_key())
        for i in range(300)
    ]
    _envelopes.wrap(site.workdir, [v1], fleet, passphrase=repo.no_passphrase)
    grown = _envelopes.wrap(site.workdir, [v2], fleet, passphrase=repo.no_passphrase)
    assert grown.summary["bins"] == 4  # 600 envelopes
    repo.promote(site.workdir, "digits", "1.0.0", channel="stable", passphrase=repo.no_passphrase)
    refused = run(capsys, "keys", "prune", "digits", "1.0.0", "--repo", str(site.workdir))
    assert refused[0] == 3 and "still named by channel stable" in refused[2]
    repo.revoke(site.workdir, "digits", "1.0.0", passphrase=repo.no_passphrase)
    code, out, err = run(
        capsys, "keys", "prune", "digits", "1.0.0", "--repo", str(site.workdir), "--json"
    )
    assert code == 0, err
    done = json.loads(out)
    assert done["withdrawn"] == 300 and done["bins"] == 4
    updater, _ = site.client(tmp_path / "pruned")
    updater.refresh()
    first = fleet[0].device_id
    assert updater.get_targetinfo(env.envelope_target_path("digits", "1.0.0", first)) is None
    assert updater.get_targetinfo(env.envelope_target_path("digits", "1.0.0", first)) is None
    assert updater.get_targetinfo(env.envelope_target_path("digits", "2.0.0", first))


def test_a_device_that_saw_the_old_bins_follows_a_rebin_across_a_name_width(
    site: Site, tmp_path: Path
) -> None:
    """8 bins (names 0-7) grow to 32 (names 00-1f): the old names stay in the snapshot,
    so a device holding the old snapshot accepts the new one (TUF refuses a dropped role)."""
    release = _envelopes.release_of(site.bundle, site.producer.fleet)
    fleet = [
        _envelopes.Device(f"dev-{i:020x}", x25519.X25519PrivateKey.generate().public_key())
        for i in range(4200)
    ]
    first = _envelopes.wrap(site.workdir, [release], fleet[:1500], passphrase=repo.no_passphrase)
    assert first.summary["bins"] == 8
    home = tmp_path / "long-lived"
    updater, _ = site.client(home)
    updater.refresh()
    assert updater.get_targetinfo(env.envelope_target_path("digits", "1.0.0", fleet[0].device_id))
    grown = _envelopes.wrap(site.workdir, [release], fleet[1500:], passphrase=repo.no_passphrase)
    assert grown.summary["bins"] == 32
    fetcher = RecordingFetcher()
    again = Updater(
        metadata_dir=str(home / "metadata"),
        metadata_base_url=f"{site.url}/metadata/",
        target_base_url=f"{site.url}/targets/",
        target_dir=str(home / "targets"),
        fetcher=fetcher,
        bootstrap=None,
    )
    again.refresh()
    for device in (fleet[0], fleet[4199]):
        path = env.envelope_target_path("digits", "1.0.0", device.device_id)
        assert again.get_targetinfo(path)
