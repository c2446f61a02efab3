"""Enrolment: pin the trusted root, make or take the device key, write the configuration."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from device_agent import config as config_mod
from device_agent import tufclient
from device_agent.config import AgentConfig, Limits
from edgepack import keys
from edgepack.errors import InvalidInputError

KEYS_DIR = "keys"
KEY_STEM = "device"
TRUST_NAME = "trust-policy"


@dataclass(frozen=True)
class Enrolment:
    """What enrolment produced."""

    device_id: str
    public_key: Path
    config_path: Path
    warnings: tuple[str, ...] = ()


def _check_profile(profile: str) -> tuple[str, ...]:
    """Refuse an unknown profile name; warn when a named profile is for another architecture.

    A named profile is the operator's word on the device class (it also sets
    the architecture whose variants the device takes), so a mismatch with this
    machine is allowed — a simulated device, a test rig — but said out loud.
    """
    if profile in ("", "auto"):
        return ()
    from device_agent.selection import machine_architecture
    from edgepack.hw import load_profile

    wanted = load_profile(profile).architecture
    here = machine_architecture()
    if wanted != here:
        return (
            f"profile {profile!r} is for {wanted} but this machine is {here}: the device will take "
            f"{wanted} variants (use --profile auto on real hardware)",
        )
    return ()


def device_id_for(public_raw: bytes) -> str:
    """A stable id derived from the device's public key (same key, same id)."""
    return "dev-" + hashlib.sha256(b"edgepack-device-id\x00" + public_raw).hexdigest()[:20]


def _urls(repo_url: str) -> tuple[str, str]:
    if "://" not in repo_url:
        repo_url = Path(repo_url).absolute().as_uri()  # an offline copy of the repository
    base = repo_url.rstrip("/")
    return f"{base}/metadata/", f"{base}/targets/"


def enroll(
    data_dir: Path,
    *,
    repo_url: str,
    root: Path,
    models: list[str],
    channel: str = "stable",
    cohort: str = "",
    profile: str = "auto",
    trust: Path | None = None,
    recipient_key: Path | None = None,
    limits: Limits | None = None,
) -> Enrolment:
    """Enrol this device; everything written stays inside ``data_dir``.

    ``models`` must name at least one model: the repository has no list of models
    a device could follow by itself, and a device that follows nothing would poll
    for ever and install nothing without saying so.
    """
    if not models:
        raise InvalidInputError(
            "name at least one model to follow, e.g. --model digits (repeat for more)"
        )
    config_mod.check_names(models, channel, cohort)  # they become paths the agent deletes
    warnings = _check_profile(profile)
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o750)  # the agent's user and the applications' group only
    try:
        root_bytes = root.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"cannot read the root metadata {root}: {exc}") from None
    try:
        tufclient.pin_root(data_dir, root_bytes)
    except Exception as exc:
        raise InvalidInputError(f"{root} is not TUF root metadata: {exc}") from None
    keys_dir = data_dir / KEYS_DIR
    keys_dir.mkdir(mode=0o700, exist_ok=True)
    if recipient_key is not None:
        private = keys.load_recipient_private_key(recipient_key)
        key_path = recipient_key.absolute()
        pub_path = keys_dir / f"{KEY_STEM}.pub"
        keys.write_public_file(pub_path, keys.public_pem(private.public_key()))
    else:
        key_path = keys_dir / f"{KEY_STEM}.key"
        pub_path = keys_dir / f"{KEY_STEM}.pub"
        if key_path.exists():  # re-enrolment keeps the device's identity
            private = keys.load_recipient_private_key(key_path)
        else:
            private = keys.generate_recipient_key()
            keys.write_recipient_keypair(keys_dir / KEY_STEM, private)
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    trust_path = ""
    if trust is not None:
        try:
            is_key = b"-----BEGIN PUBLIC KEY-----" in trust.read_bytes()
        except OSError as exc:
            raise InvalidInputError(f"cannot read the trust policy {trust}: {exc}") from None
        if is_key:  # a single producer key: keep a copy, so the device stands alone
            dest = keys_dir / f"{TRUST_NAME}.pub"
            shutil.copyfile(trust, dest)
            trust_path = str(dest)
        else:  # a policy file names its keys relative to itself: keep it where it is
            trust_path = str(trust.absolute())
    metadata_url, targets_url = _urls(repo_url)
    cfg = AgentConfig(
        data_dir=data_dir,
        device_id=device_id_for(raw),
        metadata_url=metadata_url,
        targets_url=targets_url,
        models=list(dict.fromkeys(models)),
        channel=channel,
        cohort=cohort,
        profile=profile,
        trust_policy=trust_path,
        recipient_key=str(key_path),
        limits=limits or Limits(),
    )
    config_mod.save(cfg)
    return Enrolment(cfg.device_id, pub_path, cfg.config_path, warnings)
