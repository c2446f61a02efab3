"""The device's keys at rest, sealed by a real (software) TPM 2.0 or kept in files.

Against Debian's swtpm started here on loopback (``tests/agent/_swtpm.py``): a key
sealed by one TPM unseals on it, also after the TPM restarts, and never on another
TPM (a stolen disk in another machine); ``edgepack-agent enroll --key-protection tpm``
leaves only sealed blobs on disk, no key bytes in any form; a TPM that cannot be
reached at enrolment is one line, exit 5, and nothing written.
"""

from __future__ import annotations

import base64
import json
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

from device_agent import config, enroll, keyprotect
from edgepack import keys
from edgepack.errors import KeyFileError
from tests.agent._support import MODEL, World, fast_limits, run_agent
from tests.agent._swtpm import SwTpm, skip_unless_available


@pytest.fixture(scope="module")
def tpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwTpm]:
    """One software TPM for the module's tests (each uses its own data directory)."""
    skip_unless_available()
    with SwTpm(tmp_path_factory.mktemp("swtpm")) as instance:
        yield instance


def _raw(private: x25519.X25519PrivateKey) -> bytes:
    return private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def _forms(secret: bytes) -> list[bytes]:
    """Every spelling of a key's bytes a careless write could leave on disk."""
    forms = [secret, secret.hex().encode(), base64.b64encode(secret)]
    if len(secret) == 32:
        pem = keys.private_pem(x25519.X25519PrivateKey.from_private_bytes(secret), None)
        body = b"".join(line for line in pem.splitlines() if not line.startswith(b"-----"))
        forms += [body, base64.b64decode(body)]
    return forms


def _files_holding(root: Path, secrets_: list[bytes]) -> list[str]:
    """The files under ``root`` whose bytes contain any form of any of ``secrets_``."""
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            for secret in secrets_:
                if any(form in data for form in _forms(secret)):
                    found.append(str(path.relative_to(root)))
    return found


def _enroll_args(world: World, data: Path, *extra: str) -> list[str]:
    return [
        "enroll",
        "--repo-url",
        world.server.url,
        "--root",
        str(world.root_json),
        "--model",
        MODEL,
        "--trust",
        str(world.producer_pub),
        "--data-dir",
        str(data),
        *extra,
    ]


def _enroll(world: World, data: Path, protection: str, tcti: str) -> enroll.Enrolment:
    return enroll.enroll(
        data,
        repo_url=world.server.url,
        root=world.root_json,
        models=[MODEL],
        trust=world.producer_pub,
        limits=fast_limits(),
        key_protection=protection,
        tpm_tcti=tcti,
    )


def _closed_port() -> int:
    """A loopback port nothing listens on (nor on the one after it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_sealed_storage_key_unseals_on_its_tpm_also_after_a_restart(tmp_path: Path) -> None:
    skip_unless_available()
    data = tmp_path / "data"
    with SwTpm(tmp_path / "tpm") as tpm:
        key = keyprotect.ensure_storage_key(data, "tpm", tpm.tcti)
        sealed = keyprotect.sealed_storage_key_path(data)
        assert stat.S_IMODE(sealed.stat().st_mode) == 0o440  # the applications' group unseals
        assert not keyprotect.storage_key_path(data).exists()
        assert _files_holding(data, [key]) == []
        assert keyprotect.load_storage_key(data) == key  # the TPM the blob names
        assert keyprotect.ensure_storage_key(data, "tpm", tpm.tcti) == key  # made once
        tpm.stop()
        with pytest.raises(KeyFileError, match="cannot reach the TPM"):
            keyprotect.load_storage_key(data)
        tpm.start()  # a reboot: the same TPM, on another port now
        assert keyprotect.load_storage_key(data, tcti=tpm.tcti) == key
        assert keyprotect.ensure_storage_key(data, "tpm", tpm.tcti) == key
        assert json.loads(sealed.read_bytes())["tcti"] == tpm.tcti  # found there from now on
        assert keyprotect.load_storage_key(data) == key


def test_keys_sealed_by_one_tpm_do_not_unseal_on_another(tpm: SwTpm, tmp_path: Path) -> None:
    data = tmp_path / "data"
    storage = keyprotect.ensure_storage_key(data, "tpm", tpm.tcti)
    recipient = keys.generate_recipient_key()
    (data / "keys").mkdir(mode=0o700)
    sealed_recipient = keyprotect.store_recipient_key(
        data / "keys" / "device.key", recipient, "tpm", tpm.tcti
    )
    cfg = config.AgentConfig(
        data_dir=data,
        device_id="d",
        metadata_url="",
        targets_url="",
        recipient_key=str(sealed_recipient),
        key_protection="tpm",
        tpm_tcti=tpm.tcti,
    )
    assert _raw(keyprotect.load_recipient_key(cfg, None)) == _raw(recipient)
    # The disk in another machine: the same blobs, another TPM.
    with SwTpm(tmp_path / "other") as other:
        with pytest.raises(KeyFileError, match="sealed by another TPM") as caught:
            keyprotect.load_storage_key(data, tcti=other.tcti)
        assert "\n" not in caught.value.diagnostics()
        cfg.tpm_tcti = other.tcti
        with pytest.raises(KeyFileError, match="sealed by another TPM"):
            keyprotect.load_recipient_key(cfg, None)
        # Nor can that TPM be talked into re-sealing the key for itself.
        with pytest.raises(KeyFileError, match="sealed by another TPM"):
            keyprotect.ensure_storage_key(data, "tpm", other.tcti)
    assert keyprotect.load_storage_key(data) == storage  # its own TPM still does


def test_enrol_with_a_tpm_leaves_only_sealed_blobs_on_disk(
    tpm: SwTpm, world: World, tmp_path: Path
) -> None:
    data, scratch = tmp_path / "dev", tmp_path / "tmp"
    scratch.mkdir()
    args = _enroll_args(world, data, "--key-protection", "tpm", "--tpm-tcti", tpm.tcti)
    out = run_agent(*args, env={"TMPDIR": str(scratch)})
    assert out.returncode == 0, out.stderr
    cfg = config.load(data)
    assert (cfg.key_protection, cfg.tpm_tcti) == ("tpm", tpm.tcti)
    assert cfg.recipient_key == str(data / "keys" / "device.key.tpm")
    assert stat.S_IMODE(Path(cfg.recipient_key).stat().st_mode) == 0o600
    assert not (data / "keys" / "device.key").exists()
    recipient = keyprotect.load_recipient_key(cfg, None)
    assert keys.public_pem(recipient.public_key()) == (data / "keys" / "device.pub").read_bytes()
    storage = keyprotect.load_storage_key(data)
    # No form of either key anywhere in the data directory, nor left in the temp folder.
    assert _files_holding(data, [_raw(recipient), storage]) == []
    assert list(scratch.iterdir()) == []


def test_a_given_recipient_key_is_kept_sealed_and_needs_no_passphrase(
    tpm: SwTpm, world: World, tmp_path: Path
) -> None:
    locked = world.base / "fleet-locked"
    keys.write_keypair(locked, world.fleet_key, b"fleet secret")
    data = tmp_path / "dev"
    args = _enroll_args(world, data, "--key-protection", "tpm", "--tpm-tcti", tpm.tcti)
    out = run_agent(
        *args,
        "--recipient-key",
        str(locked.with_suffix(".key")),
        "--passphrase-env",
        "FLEET_PASS",
        env={"FLEET_PASS": "fleet secret"},
    )
    assert out.returncode == 0, out.stderr
    cfg = config.load(data)
    assert cfg.recipient_key == str(data / "keys" / "recipient.key.tpm")
    assert not (data / "keys" / "recipient.key").exists()
    assert _raw(keyprotect.load_recipient_key(cfg, None)) == _raw(world.fleet_key)
    assert _files_holding(data, [_raw(world.fleet_key)]) == []


@pytest.mark.parametrize("where", ["stopped swtpm", "no TPM device"])
def test_enrol_with_an_unreachable_tpm_is_one_line_and_writes_nothing(
    world: World, tmp_path: Path, where: str
) -> None:
    skip_unless_available()
    if where == "no TPM device":
        if Path("/dev/tpmrm0").exists():
            pytest.skip("this machine has a TPM at the default /dev/tpmrm0")
        tcti: tuple[str, ...] = ()  # the default, the kernel's resource manager
    else:
        tcti = ("--tpm-tcti", f"swtpm:host=127.0.0.1,port={_closed_port()}")
    data = tmp_path / "dev"
    out = run_agent(*_enroll_args(world, data, "--key-protection", "tpm", *tcti))
    assert out.returncode == 5, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "cannot reach the TPM" in lines[0] and "--key-protection file" in lines[0]
    assert not data.exists()


def test_re_enrolment_moves_the_same_keys_between_files_and_the_tpm(
    tpm: SwTpm, world: World, tmp_path: Path
) -> None:
    data = tmp_path / "dev"
    _enroll(world, data, "file", "")
    storage = keyprotect.ensure_storage_key(data, "file")
    recipient = _raw(keys.load_recipient_private_key(data / "keys" / "device.key"))

    _enroll(world, data, "tpm", tpm.tcti)
    assert not (data / "keys" / "device.key").exists()
    assert not keyprotect.storage_key_path(data).exists()
    assert _files_holding(data, [recipient, storage]) == []
    cfg = config.load(data)
    assert _raw(keyprotect.load_recipient_key(cfg, None)) == recipient  # the same device
    assert keyprotect.load_storage_key(data) == storage  # installed revisions still open
    blob = Path(cfg.recipient_key).read_bytes()
    again = enroll.enroll(  # the settings kept when not given
        data,
        repo_url=world.server.url,
        root=world.root_json,
        models=[MODEL],
        trust=world.producer_pub,
    )
    assert config.load(data).key_protection == "tpm"
    assert Path(cfg.recipient_key).read_bytes() == blob and again.cleared == ()

    _enroll(world, data, "file", tpm.tcti)
    assert not keyprotect.sealed_storage_key_path(data).exists()
    assert not (data / "keys" / "device.key.tpm").exists()
    assert keyprotect.load_storage_key(data) == storage
    assert _raw(keys.load_recipient_private_key(data / "keys" / "device.key")) == recipient


def test_a_sealed_blob_that_is_damaged_or_too_readable_is_refused(tmp_path: Path) -> None:
    blob = keyprotect.SealedBlob(b"pub", b"priv", "swtpm:host=127.0.0.1,port=1")
    path = tmp_path / "device.key.tpm"
    path.write_bytes(blob.to_bytes())
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="readable by other users"):
        keyprotect.unseal_file(path)
    path.chmod(0o600)
    for damaged in (b"{}", b"not json", json.dumps({"format": keyprotect.SEALED_FORMAT}).encode()):
        path.write_bytes(damaged)
        with pytest.raises(KeyFileError, match="is not a TPM-sealed key"):
            keyprotect.unseal_file(path)


def test_without_tpm2_tools_the_tpm_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a system without tpm2-tools
    with pytest.raises(KeyFileError, match="tpm2_createprimary is not installed") as caught:
        keyprotect.Tpm("swtpm:host=127.0.0.1,port=1").check()
    assert "apt-get install tpm2-tools" in caught.value.diagnostics()
