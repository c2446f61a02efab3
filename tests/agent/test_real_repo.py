"""The agent against the project's own repository tool (``edgepack.repo``): delegations,
hash-bin layout, per-profile variants, rollback and revocation as operators publish them."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_agent import config, enroll, loop
from device_agent.agent import Agent
from device_agent.config import AgentConfig
from device_agent.selection import Device, machine_architecture
from device_agent.slots import Slots
from edgepack import bundle, keys, repo
from edgepack.signing import ProducerKeySigner
from tests.agent._support import MODEL, World, fast_limits, make_model_dir
from tests.agent.conftest import poll

PROFILES = {"intel-nuc": "x86_64", "raspberry-pi-4": "aarch64"}


class Fleet:
    """A repository made with edgepack.repo, served by edgepack.repo.make_server."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.workdir = base / "repo"
        repo.init(self.workdir, passphrase=None)
        keys.write_keypair(base / "team", keys.generate_signing_key())
        repo.add_model(self.workdir, MODEL, base / "team.pub", passphrase=repo.no_passphrase)
        self.producer = keys.generate_signing_key()
        keys.write_keypair(base / "producer", self.producer)
        self.fleet = keys.generate_recipient_key()
        keys.write_recipient_keypair(base / "fleet", self.fleet)
        self.httpd = repo.make_server(self.workdir, "127.0.0.1", 0)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def release(self, version: str, scale: float) -> None:
        """Build one bundle per profile and publish them to stable."""
        paths = []
        for profile, arch in PROFILES.items():
            src = self.base / f"src-{version}-{profile}"
            shutil.rmtree(src, ignore_errors=True)
            health = make_model_dir(src, scale + (0.5 if arch == "aarch64" else 0.0))
            paths.append(
                bundle.pack(
                    src,
                    self.base / "bundles",
                    name=MODEL,
                    version=version,
                    recipients=[self.fleet.public_key()],
                    signer=ProducerKeySigner(self.producer),
                    profile=profile,
                    architectures=[arch],
                    health=health,
                ).path
            )
        repo.publish(
            self.workdir,
            paths,
            key=str(self.base / "team.key"),
            passphrase=repo.no_passphrase,
            channel="stable",
        )

    def device(self, data: Path, profile: str) -> None:
        enroll.enroll(
            data,
            repo_url=self.url,
            root=self.workdir / "public/metadata/1.root.json",
            models=[MODEL],
            profile=profile,
            trust=self.base / "producer.pub",
            recipient_key=self.base / "fleet.key",
            limits=fast_limits(),
        )


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path / "fleet")
    yield f
    f.httpd.shutdown()
    f.httpd.server_close()


def test_named_profile_takes_its_architecture() -> None:
    cfg = AgentConfig(Path("/nonexistent"), "dev-1", "u", "u", profile="raspberry-pi-4")
    assert Device.from_config(cfg).architecture == "aarch64"


def test_each_profile_gets_its_variant_then_rollback_and_revoke(
    fleet: Fleet, tmp_path: Path
) -> None:
    nuc, pi = tmp_path / "nuc", tmp_path / "pi"
    fleet.device(nuc, "intel-nuc")
    fleet.device(pi, "raspberry-pi-4")
    fleet.release("1.0.0", 2.0)
    for d in (nuc, pi):
        assert poll(d).action == "installed"
    revs = {d: Slots(d, MODEL).current() for d in (nuc, pi)}
    assert revs[nuc] != revs[pi]  # different bundles for different profiles
    fleet.release("2.0.0", 3.0)
    assert poll(nuc).action == "installed"
    v2 = Slots(nuc, MODEL).current()
    repo.rollback(fleet.workdir, MODEL, channel="stable", passphrase=repo.no_passphrase)
    out = poll(nuc)
    assert out.action == "rolled-back" and Slots(nuc, MODEL).current() == revs[nuc]
    repo.revoke(fleet.workdir, MODEL, "2.0.0", passphrase=repo.no_passphrase)
    assert poll(nuc).action == "up-to-date"
    assert v2 in Slots(nuc, MODEL).installed()  # cached, but revoked: never reverted to
    assert poll(pi).action == "up-to-date"  # the pi never took 2.0.0 after the rollback


def test_two_models_are_independent(fleet: Fleet, tmp_path: Path) -> None:
    from device_agent import config, loop
    from device_agent.agent import Agent

    other = "iris"
    repo.add_model(fleet.workdir, other, fleet.base / "team.pub", passphrase=repo.no_passphrase)
    fleet.release("1.0.0", 2.0)
    src = fleet.base / "src-iris"
    health = make_model_dir(src, 5.0, bad_golden=True)  # this one fails its health check
    bad = bundle.pack(
        src,
        fleet.base / "bundles",
        name=other,
        version="1.0.0",
        recipients=[fleet.fleet.public_key()],
        signer=ProducerKeySigner(fleet.producer),
        health=health,
    ).path
    repo.publish(
        fleet.workdir,
        [bad],
        key=str(fleet.base / "team.key"),
        passphrase=repo.no_passphrase,
        channel="stable",
    )
    data = tmp_path / "dev"
    enroll.enroll(
        data,
        repo_url=fleet.url,
        root=fleet.workdir / "public/metadata/1.root.json",
        models=[MODEL, other],
        profile="intel-nuc",
        trust=fleet.base / "producer.pub",
        recipient_key=fleet.base / "fleet.key",
        limits=fast_limits(),
    )
    outcomes = {o.model: o for o in loop.poll_once(Agent(config.load(data)))}
    assert outcomes[MODEL].action == "installed"
    assert outcomes[other].action == "failed" and "health check" in str(outcomes[other].error)
    assert Slots(data, MODEL).current() is not None and Slots(data, other).current() is None


def test_a_variant_pointed_at_another_profile_s_bundle_is_refused(
    world: World, tmp_path: Path
) -> None:
    """The operator's channel puts the intel-nuc build under generic-x86_64 (or the
    Pi 4 build under generic-aarch64): the bundle's signed profile decides."""
    from edgepack import channel as ch

    arch = machine_architecture()
    specific = {"x86_64": "intel-nuc", "aarch64": "raspberry-pi-4"}[arch]
    src = world.base / "src-specific"
    health = make_model_dir(src, 2.0)
    path = bundle.pack(
        src,
        world.base / "bundles",
        name=MODEL,
        version="1.0.0",
        recipients=[world.fleet_key.public_key()],
        signer=ProducerKeySigner(world.producer_key),
        profile=specific,
        architectures=[arch],
        health=health,
    ).path
    target = world.repo.add_bundle(path, "1.0.0")
    generic = f"generic-{arch}"
    variants = {generic: ch.Variant(target, arch)}
    world.repo.set_channel(ch.promote(world.repo.doc, ch.Release("1.0.0", 100.0, (), variants)))
    data = tmp_path / "dev"
    enroll.enroll(
        data,
        repo_url=world.server.url,
        root=world.root_json,
        models=[MODEL],
        profile=generic,
        trust=world.producer_pub,
        recipient_key=world.fleet_key_path,
        limits=fast_limits(),
    )
    out = loop.poll_once(Agent(config.load(data)))[0]
    assert out.action == "failed" and f"built for the {specific} profile" in str(out.error)
    assert Slots(data, MODEL).current() is None
