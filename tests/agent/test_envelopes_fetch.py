"""The device fetching its key envelope: a real repository (``edgepack.repo``) served on
loopback by the agent tests' recording server, devices enrolled by the real enrolment
code, and ``device_agent.envelopes.fetch_content_key`` through the agent's own TufClient.

Wrong envelopes are planted the way an insider holding the operators' key could: signed
correctly, so TUF accepts them, and only the device's own checks stand in the way.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519

from device_agent import config, enroll
from device_agent.envelopes import fetch_content_key
from device_agent.errors import EnvelopeError
from device_agent.fetcher import AgentFetcher
from device_agent.tufclient import TufClient
from edgepack import envelope as env
from edgepack import keys, repo
from edgepack.bundle import read_info
from edgepack.bundle.metadata import hpke_info
from edgepack.crypto import unwrap_key
from edgepack.errors import VerificationError
from edgepack.repo import _envelopes
from edgepack.repo._ops import open_store
from edgepack.repo._store import publish_lock
from edgepack.repo._tuf import TargetFile
from tests.agent._support import REPO_ROOT, FaultServer, fast_limits
from tests.repo.conftest import Producer, make_bundle, team_key


@dataclass
class Site:
    """A served repository with releases 1.0.0 and 2.0.0 of "digits" and two devices."""

    workdir: Path
    server: FaultServer
    producer: Producer
    bundles: dict[str, Path]
    devices: dict[str, Path]  # device id → data directory

    def wrap(self, version: str, *device_ids: str) -> None:
        release = _envelopes.release_of(self.bundles[version], self.producer.fleet)
        found = []
        for device_id in device_ids:
            record = self.devices[device_id] / "keys" / "enrolment.json"
            found += _envelopes.load_devices(record)[0]
        _envelopes.wrap(self.workdir, [release], found, passphrase=repo.no_passphrase)

    def client(self, device_id: str) -> tuple[TufClient, x25519.X25519PrivateKey]:
        cfg = config.load(self.devices[device_id])
        client = TufClient(cfg, AgentFetcher(cfg.limits, tmp_dir=cfg.data_dir / "downloads"))
        client.refresh()
        return client, keys.load_recipient_private_key(Path(cfg.recipient_key))

    def fetch(self, device_id: str, version: str) -> bytes | None:
        client, key = self.client(device_id)
        info = read_info(self.bundles[version])
        return fetch_content_key(
            client,
            device_id=device_id,
            name=info.name,
            version=info.version,
            profile=info.profile,
            bundle_sha256=_envelopes.release_of(
                self.bundles[version], self.producer.fleet
            ).bundle_sha256,
            info=hpke_info(info.name, info.version, info.profile, info.encryption),
            recipient_key=key,
        )

    def content_key(self, version: str) -> bytes:
        info = read_info(self.bundles[version])
        return unwrap_key(
            list(info.encryption.recipients),
            self.producer.fleet,
            hpke_info(info.name, info.version, info.profile, info.encryption),
        )

    def plant(self, path: str, data: bytes) -> None:
        """Publish ``data`` as the envelope at ``path``, signed by the operators' key."""
        paths, _settings, store = open_store(self.workdir, repo.no_passphrase, None)
        with publish_lock(paths):
            role = _envelopes._Role.load(store)
            signer = store.signers("operators")[0]
            role.add({path: (TargetFile.from_data(path, data), data)})
            _envelopes._delegate(store, signer)
            role.stage(signer)
            store.commit()

    def envelope(self, device_id: str, version: str) -> env.Envelope:
        path = env.envelope_target_path("digits", version, device_id)
        _paths, _settings, store = open_store(self.workdir, repo.no_passphrase, None)
        role = _envelopes._Role.load(store)
        info = role.find(path)
        assert info is not None
        return env.parse_envelope(store.read_target(info))


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    producer = Producer(keys.generate_signing_key(), keys.generate_recipient_key())
    workdir = tmp_path / "repo"
    repo.init(workdir, passphrase=None)
    private, public = team_key(tmp_path / "teams", "digits")
    repo.add_model(workdir, "digits", public, passphrase=repo.no_passphrase)
    bundles = {}
    for version in ("1.0.0", "2.0.0"):
        bundles[version] = make_bundle(tmp_path / "bundles", producer, "digits", version)
        repo.publish(workdir, [bundles[version]], key=str(private), passphrase=repo.no_passphrase)
    server = FaultServer(workdir / "public")
    devices = {}
    for i in range(2):
        data = tmp_path / f"device-{i}"
        result = enroll.enroll(
            data,
            repo_url=server.url,
            root=workdir / "public/metadata/1.root.json",
            models=["digits"],
            limits=fast_limits(),
        )
        devices[result.device_id] = data
    try:
        yield Site(workdir, server, producer, bundles, devices)
    finally:
        server.stop()


def test_the_device_gets_the_content_key_from_its_own_bin(site: Site) -> None:
    one, two = sorted(site.devices)
    site.wrap("1.0.0", one, two)
    site.server.requests.clear()
    assert site.fetch(one, "1.0.0") == site.content_key("1.0.0")
    bins = [p for p, _ in site.server.requests if "envelopes~bin" in p]
    assert len(bins) == 1, site.server.requests
    assert site.fetch(two, "1.0.0") == site.content_key("1.0.0")


def test_no_envelope_is_none(site: Site) -> None:
    one, two = sorted(site.devices)
    assert site.fetch(one, "1.0.0") is None  # no envelopes role at all yet
    site.wrap("1.0.0", one)
    assert site.fetch(two, "1.0.0") is None  # another device's only
    assert site.fetch(one, "2.0.0") is None  # another release's only


def test_another_devices_envelope_is_refused(site: Site) -> None:
    one, two = sorted(site.devices)
    site.wrap("1.0.0", two)
    theirs = site.envelope(two, "1.0.0")
    site.plant(env.envelope_target_path("digits", "1.0.0", one), theirs.to_bytes())
    with pytest.raises(EnvelopeError, match=f"is for device {two}, not this one"):
        site.fetch(one, "1.0.0")


def test_an_envelope_replayed_from_an_older_release_is_refused(site: Site) -> None:
    one, _two = sorted(site.devices)
    site.wrap("1.0.0", one)
    old = site.envelope(one, "1.0.0")
    site.plant(env.envelope_target_path("digits", "2.0.0", one), old.to_bytes())
    with pytest.raises(EnvelopeError, match="replayed from another release") as caught:
        site.fetch(one, "2.0.0")
    assert isinstance(caught.value, VerificationError) and caught.value.exit_code == 4


def test_an_envelope_for_other_bundle_bytes_is_refused(site: Site) -> None:
    one, _two = sorted(site.devices)
    site.wrap("1.0.0", one)
    good = site.envelope(one, "1.0.0")
    other = env.Envelope(**{**good.__dict__, "bundle_sha256": "0" * 64})
    site.plant(good.target_path, other.to_bytes())
    with pytest.raises(EnvelopeError, match="another bundle"):
        site.fetch(one, "1.0.0")


def test_an_envelope_sealed_to_another_key_is_refused(site: Site) -> None:
    one, _two = sorted(site.devices)
    stranger = x25519.X25519PrivateKey.generate().public_key()
    info = read_info(site.bundles["1.0.0"])
    release = _envelopes.release_of(site.bundles["1.0.0"], site.producer.fleet)
    wrong = env.make_envelope(
        site.content_key("1.0.0"),
        stranger,
        name="digits",
        version="1.0.0",
        profile=info.profile,
        bundle_sha256=release.bundle_sha256,
        device_id=one,
        info=release.info,
    )
    site.plant(wrong.target_path, wrong.to_bytes())
    with pytest.raises(EnvelopeError, match="sealed to key"):
        site.fetch(one, "1.0.0")


def test_an_altered_sealed_key_does_not_open(site: Site) -> None:
    one, _two = sorted(site.devices)
    site.wrap("1.0.0", one)
    good = site.envelope(one, "1.0.0")
    flipped = bytes([good.sealed[0] ^ 1]) + good.sealed[1:]
    site.plant(good.target_path, env.Envelope(**{**good.__dict__, "sealed": flipped}).to_bytes())
    with pytest.raises(EnvelopeError, match="does not open"):
        site.fetch(one, "1.0.0")


def test_a_malformed_envelope_is_refused(site: Site) -> None:
    one, _two = sorted(site.devices)
    site.wrap("1.0.0", one)
    site.plant(env.envelope_target_path("digits", "1.0.0", one), b'{"format": "nope"}')
    with pytest.raises(EnvelopeError, match="malformed"):
        site.fetch(one, "1.0.0")


def test_crash_point_right_after_the_envelope_is_read(site: Site) -> None:
    """``EDGEPACK_AGENT_CRASH_AT=envelope-fetched:1`` kills the process there (SIGKILL)."""
    one, _two = sorted(site.devices)
    site.wrap("1.0.0", one)
    bundle = site.bundles["1.0.0"]
    release = _envelopes.release_of(bundle, site.producer.fleet)
    code = (
        "import pathlib, sys\n"
        "from device_agent import config\n"
        "from device_agent.envelopes import fetch_content_key\n"
        "from device_agent.fetcher import AgentFetcher\n"
        "from device_agent.tufclient import TufClient\n"
        "from edgepack import keys\n"
        "from edgepack.bundle import read_info\n"
        "from edgepack.bundle.metadata import hpke_info\n"
        f"cfg = config.load(pathlib.Path({str(site.devices[one])!r}))\n"
        "client = TufClient(cfg, AgentFetcher(cfg.limits))\n"
        "client.refresh()\n"
        f"info = read_info(pathlib.Path({str(bundle)!r}))\n"
        "key = fetch_content_key(client, device_id=cfg.device_id, name=info.name,\n"
        "    version=info.version, profile=info.profile,\n"
        f"    bundle_sha256={release.bundle_sha256!r},\n"
        "    info=hpke_info(info.name, info.version, info.profile, info.encryption),\n"
        "    recipient_key=keys.load_recipient_private_key(pathlib.Path(cfg.recipient_key)))\n"
        "print(key.hex())\n"
    )

    def child(crash: str | None) -> subprocess.CompletedProcess[str]:
        env_vars = {"PATH": "/usr/bin:/bin"}
        if crash:
            env_vars["EDGEPACK_AGENT_CRASH_AT"] = crash
        return subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env=env_vars,
            cwd=REPO_ROOT,
            timeout=120,
            check=False,
        )

    killed = child("envelope-fetched:1")
    assert killed.returncode == -9, killed.stderr
    whole = child(None)
    assert whole.returncode == 0, whole.stderr
    assert whole.stdout.strip() == site.content_key("1.0.0").hex()
