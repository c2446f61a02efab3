"""A device's identity is its own: an Ed25519 identity key names it, not the recipient key
it decrypts with, so a fleet sharing one recipient key still splits in a rollout; and the
recipient key is kept in DATA, encrypted when it was given encrypted, opened with a
passphrase from --passphrase-env, $EDGEPACK_PASSPHRASE or a systemd credential."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from device_agent import config, enroll
from device_agent.selection import Device, select
from edgepack import keys
from tests.agent._support import MODEL, World, fast_limits, run_agent

REPO = Path(__file__).resolve().parents[2]
PASSPHRASE = "fleet secret"


def _enroll(world: World, data: Path, recipient_key: Path | None, **kw: object) -> str:
    result = enroll.enroll(
        data,
        repo_url=world.server.url,
        root=world.root_json,
        models=[MODEL],
        trust=world.producer_pub,
        recipient_key=recipient_key,
        limits=fast_limits(),
        **kw,  # type: ignore[arg-type]
    )
    return result.device_id


def _pair_matches(key: Path, pub: Path) -> bool:
    return keys.public_pem(keys.load_recipient_private_key(key).public_key()) == pub.read_bytes()


def _agent(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_agent(*args, env=env)


def test_devices_sharing_a_fleet_key_have_distinct_ids_and_a_rollout_splits(
    world: World, tmp_path: Path
) -> None:
    ids = [_enroll(world, tmp_path / f"dev{i}", world.fleet_key_path) for i in range(20)]
    assert len(set(ids)) == 20  # one fleet key, twenty devices, twenty ids
    world.publish("1.0.0", 2.0, promote=False)
    world.repo.promote("1.0.0", world.targets["1.0.0"], rollout=50)
    # The selection the agent makes at each poll, from each device's own configuration.
    admitted = [
        select(world.repo.doc, Device.from_config(config.load(tmp_path / f"dev{i}"))).ok
        for i in range(20)
    ]
    assert 0 < sum(admitted) < 20, admitted


def test_identity_key_is_private_ed25519_and_names_the_device(world: World, tmp_path: Path) -> None:
    data = tmp_path / "dev"
    device_id = _enroll(world, data, None)
    private = data / "keys" / "identity.key"
    assert private.stat().st_mode & 0o777 == 0o600
    pem = private.read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, not encrypted
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert device_id == enroll.device_id_for(raw) == config.load(data).device_id
    public = serialization.load_pem_public_key((data / "keys" / "identity.pub").read_bytes())
    assert isinstance(public, ed25519.Ed25519PublicKey)


def test_reenrolling_with_a_recipient_key_keeps_the_id_and_a_matching_device_pair(
    world: World, tmp_path: Path
) -> None:
    data = tmp_path / "dev"
    first = _enroll(world, data, None)
    device_key, device_pub = data / "keys" / "device.key", data / "keys" / "device.pub"
    own_pub = device_pub.read_bytes()
    assert _pair_matches(device_key, device_pub)

    assert _enroll(world, data, world.fleet_key_path) == first
    assert _pair_matches(device_key, device_pub) and device_pub.read_bytes() == own_pub
    copy = data / "keys" / "recipient.key"
    assert copy.read_bytes() == world.fleet_key_path.read_bytes()
    assert copy.stat().st_mode & 0o777 == 0o600
    assert (data / "keys" / "recipient.pub").read_bytes() == (world.base / "fleet.pub").read_bytes()
    assert config.load(data).recipient_key == str(copy)

    # Back to the device's own key: still the same device.
    assert _enroll(world, data, None) == first
    assert config.load(data).recipient_key == str(device_key)
    assert device_pub.read_bytes() == own_pub


def test_an_enrolment_from_before_the_identity_key_keeps_its_id(
    world: World, tmp_path: Path
) -> None:
    data = tmp_path / "dev"
    _enroll(world, data, world.fleet_key_path)
    # What an older agent left: an id derived from the fleet key, no identity key.
    (data / "keys" / "identity.key").unlink()
    (data / "keys" / "identity.pub").unlink()
    cfg = config.load(data)
    cfg.device_id = "dev-45d07e3af61ccbbb5c1f"
    config.save(cfg)
    assert _enroll(world, data, world.fleet_key_path) == "dev-45d07e3af61ccbbb5c1f"
    assert (data / "keys" / "identity.key").is_file()


def test_an_encrypted_recipient_key_stays_encrypted_and_run_needs_its_passphrase(
    world: World, tmp_path: Path
) -> None:
    locked = world.base / "fleet-locked"
    keys.write_keypair(locked, world.fleet_key, PASSPHRASE.encode())
    outside = locked.with_suffix(".key")
    data = tmp_path / "dev"
    enrolled = _agent(
        "enroll",
        "--repo-url",
        world.server.url,
        "--root",
        str(world.root_json),
        "--model",
        MODEL,
        "--trust",
        str(world.producer_pub),
        "--recipient-key",
        str(outside),
        "--passphrase-env",
        "FLEET_PASS",
        "--data-dir",
        str(data),
        "--json",
        env={"FLEET_PASS": PASSPHRASE},
    )
    assert enrolled.returncode == 0, enrolled.stderr
    shown = json.loads(enrolled.stdout)
    assert Path(shown["recipient_public_key"]) == data / "keys" / "recipient.pub"
    assert Path(shown["identity_public_key"]) == data / "keys" / "identity.pub"
    copy = data / "keys" / "recipient.key"
    assert copy.read_bytes() == outside.read_bytes()  # as given: still encrypted
    assert b"ENCRYPTED PRIVATE KEY" in copy.read_bytes()
    outside.unlink()  # the device no longer depends on the file outside DATA
    world.publish("1.0.0", 2.0)

    # No passphrase anywhere: exit 5 at start, a line naming the ways to give one.
    refused = _agent("run", "--once", "--data-dir", str(data), env={})
    assert refused.returncode == 5, refused.stderr
    error = [line for line in refused.stderr.splitlines() if "error" in line]
    assert len(error) == 1 and "--passphrase-env" in error[0]
    assert "LoadCredential=edgepack-passphrase" in error[0]
    assert "Traceback" not in refused.stderr

    # --passphrase-env VAR opens it.
    ran = _agent(
        "run",
        "--once",
        "--json",
        "--passphrase-env",
        "MY_PASS",
        "--data-dir",
        str(data),
        env={"MY_PASS": PASSPHRASE},
    )
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)[0]["action"] == "installed"

    # A systemd credential (LoadCredential=edgepack-passphrase:FILE) opens it too.
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "edgepack-passphrase").write_text(PASSPHRASE + "\n")
    world.publish("1.1.0", 3.0)
    ran = _agent(
        "run",
        "--once",
        "--json",
        "--data-dir",
        str(data),
        env={"CREDENTIALS_DIRECTORY": str(credentials)},
    )
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)[0]["action"] == "installed"
