"""Enrolment: pin the trusted root, make the device's identity, take its recipient key,
write the configuration.

Two keys, two jobs. The *identity* (``DATA/keys/identity.key``, Ed25519, made here
and never leaving the device) names the device: its id, and so its rollout bucket,
is derived from the identity's public key, so devices that share a fleet's
recipient key still each have their own id, and a 10 % rollout reaches about 10 %
of them. The *recipient* key (X25519) decrypts bundles: the device's own pair
``DATA/keys/device.key|.pub``, or a copy of a key the operator hands over with
``--recipient-key`` (``DATA/keys/recipient.key``, bytes as given, so an encrypted
key stays encrypted).
"""

from __future__ import annotations

import hashlib
import json
import sys
import urllib.parse
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from device_agent import _atomic, keyprotect, tufclient
from device_agent import config as config_mod
from device_agent.config import AgentConfig, Limits
from edgepack import fleetreport, keys
from edgepack._version import __version__
from edgepack.errors import EdgepackError, InvalidInputError, KeyFileError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the agent's minimum is 3.10
    import tomli as tomllib

KEYS_DIR = "keys"
KEY_STEM = "device"  # the device's own recipient pair (the name predates the identity key)
RECIPIENT_STEM = "recipient"  # the copy of a key given with --recipient-key
IDENTITY_STEM = "identity"
TRUST_NAME = "trust-policy"
RECORD_NAME = "enrolment.json"

# The one derivation of a device id, shared with the fleet service (same bytes, same id).
device_id_for = fleetreport.device_id_for


@dataclass(frozen=True)
class Enrolment:
    """What enrolment produced.

    ``public_key`` is the recipient public key (a builder's ``--recipient``);
    ``identity_key`` the identity's public key file, ``identity`` its raw bytes
    in hex; ``record`` the signed enrolment record an operator registers with
    ``edgepack fleet register``. ``cleared`` lists the failure marks forgotten because the key, trust
    policy, profile or channel changed (``model: what``).
    """

    device_id: str
    public_key: Path
    config_path: Path
    warnings: tuple[str, ...] = ()
    identity_key: Path = Path()
    identity: str = ""
    cleared: tuple[str, ...] = field(default_factory=tuple)
    record: Path = Path()


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


def _urls(repo_url: str) -> tuple[str, str]:
    """The metadata and targets URLs of ``repo_url``, refusing what no fetcher could read.

    Accepted: ``http://`` and ``https://`` with a host, ``file://`` with a path,
    or an existing directory (an offline copy of the repository's ``public/``).
    """
    if "://" not in repo_url:
        path = Path(repo_url)
        if not path.is_dir():
            raise InvalidInputError(
                f"--repo-url {repo_url!r} is neither a URL nor an existing directory",
                hint="give http(s)://HOST/…, file:///PATH or the directory of a repository copy",
            )
        repo_url = path.absolute().as_uri()
    try:
        parts = urllib.parse.urlsplit(repo_url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise InvalidInputError(f"--repo-url {repo_url!r} is not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme in ("http", "https") and not parts.hostname:
        raise InvalidInputError(f"--repo-url {repo_url!r} names no host")
    if scheme == "file" and not parts.path:
        raise InvalidInputError(f"--repo-url {repo_url!r} names no directory")
    if scheme not in ("http", "https", "file"):
        raise InvalidInputError(
            f"--repo-url {repo_url!r}: the agent reads http://, https:// or file:// only"
        )
    base = repo_url.rstrip("/")
    return f"{base}/metadata/", f"{base}/targets/"


def _previous(data_dir: Path) -> AgentConfig | None:
    """The enrolment this one replaces, when ``config.toml`` can still be read.

    A configuration the agent would refuse (re-enrolling is how it is mended)
    still gives its device id, so the device keeps its name and its buckets.
    """
    try:
        return config_mod.load(data_dir)
    except EdgepackError:
        pass
    try:
        raw = tomllib.loads((data_dir / config_mod.CONFIG_NAME).read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    device_id = raw.get("device_id")
    if not isinstance(device_id, str) or not device_id:
        return None
    return AgentConfig(data_dir=data_dir, device_id=device_id, metadata_url="", targets_url="")


def _identity(keys_dir: Path) -> tuple[ed25519.Ed25519PrivateKey, bytes, Path]:
    """The device's Ed25519 identity (the key, raw public bytes, ``.pub`` path), made on
    first use.

    Kept on re-enrolment: it is what makes the device the same device. The
    private key is not encrypted — it never leaves the device and the agent
    must use it unattended — but it is 0600 inside the 0700 keys folder.
    """
    private_path = keys_dir / f"{IDENTITY_STEM}.key"
    public_path = keys_dir / f"{IDENTITY_STEM}.pub"
    if private_path.exists():
        data = private_path.read_bytes()
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            key = None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise KeyFileError(
                f"{private_path} is not an unencrypted Ed25519 identity key",
                hint="restore it from a backup; deleting it gives this device a new id",
            )
    else:
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        keys.write_private_file(private_path, pem)
    public = key.public_key()
    pub_pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if not public_path.is_file() or public_path.read_bytes() != pub_pem:
        keys.write_public_file(public_path, pub_pem)
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key, raw, public_path


@dataclass(frozen=True)
class _GivenKey:
    """A ``--recipient-key`` opened before anything is written: the key and its file's bytes."""

    private: x25519.X25519PrivateKey
    data: bytes


def _open_given(path: Path | None, passphrase_env: str | None) -> _GivenKey | None:
    """Open ``--recipient-key`` (its passphrase is needed now to check it and derive its
    public key), so a wrong kind or passphrase is refused before enrolment writes."""
    if path is None:
        return None
    private = keys.load_recipient_private_key(path, passphrase_env)
    return _GivenKey(private, path.read_bytes())


def _recipient(
    keys_dir: Path,
    given: _GivenKey | None,
    passphrase_env: str | None,
    protection: str = "file",
    tcti: str = "",
) -> tuple[Path, Path, bytes]:
    """The recipient key the device decrypts with: (private key path, public key path,
    raw public bytes).

    With ``given``: its bytes are copied to ``keys/recipient.key`` (0600; an
    encrypted key stays encrypted) with ``keys/recipient.pub``, so the device no
    longer depends on a file outside DATA. Without: the device's own pair
    ``keys/device.key|.pub``, made on first use and kept; a ``device.pub`` that
    does not match ``device.key`` (left by an older enrolment) is written again.
    With ``protection`` ``tpm`` the private key is kept only sealed by the TPM
    (``keys/device.key.tpm`` or ``keys/recipient.key.tpm``; ``device_agent.keyprotect``).
    """
    if given is not None:
        private = given.private
        key_path = keys_dir / f"{RECIPIENT_STEM}.key"
        pub_path = keys_dir / f"{RECIPIENT_STEM}.pub"
        key_path = keyprotect.store_recipient_key(
            key_path, private, protection, tcti, file_bytes=given.data
        )
    else:
        key_path = keys_dir / f"{KEY_STEM}.key"
        pub_path = keys_dir / f"{KEY_STEM}.pub"
        private = (
            keyprotect.existing_recipient_key(key_path, passphrase_env, tcti)
            or keys.generate_recipient_key()
        )
        key_path = keyprotect.store_recipient_key(key_path, private, protection, tcti)
    pem = keys.public_pem(private.public_key())
    if not pub_path.is_file() or pub_path.read_bytes() != pem:
        keys.write_public_file(pub_path, pem)
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return key_path, pub_path, raw


def _read_trust(trust: Path | None) -> bytes | None:
    """The trust policy's bytes, read before anything is written (``None`` for none)."""
    if trust is None:
        return None
    try:
        return trust.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"cannot read the trust policy {trust}: {exc}") from None


def _trust(keys_dir: Path, trust: Path | None, data: bytes | None) -> str:
    """Where the configuration finds the producer trust policy ('' for none)."""
    if trust is None or data is None:
        return ""
    if b"-----BEGIN PUBLIC KEY-----" in data:  # one producer key: a copy, the device stands alone
        dest = keys_dir / f"{TRUST_NAME}.pub"
        keys.write_public_file(dest, data)
        return str(dest)
    return str(trust.absolute())  # a policy file names its keys relative to itself


def _digest(path: str) -> str:
    """sha256 of a file's bytes ('' when there is no file), to see whether it changed."""
    if not path:
        return ""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return ""


def _decides_failures(cfg: AgentConfig) -> tuple[str, str, str, str]:
    """What a release's refusal here may have depended on: the recipient key, the trust
    policy (by content: their copies in DATA keep their names), profile and channel."""
    return (
        _digest(cfg.recipient_key),
        _digest(cfg.trust_policy),
        cfg.profile,
        cfg.channel,
    )


def _forget_failures(data_dir: Path, profile_changed: bool) -> tuple[str, ...]:
    """Clear the failure marks a changed enrolment may have caused (the caller holds the lock).

    Refused bundles always (decryption, signature, profile fit); failed versions
    too when the profile changed, since its health budgets judged them.
    """
    from device_agent.state import Journal

    journal = Journal.load(data_dir)
    if journal.recovered:  # a damaged journal: the agent rebuilds it, leave it be
        return ()
    cleared = [
        f"{name}: {item}"
        for name, mj in journal.models.items()
        for item in mj.forget_failures(versions=profile_changed)
    ]
    if cleared:
        journal.save()
    return tuple(cleared)


def _transport(ca_file: Path | None, proxy: str | None) -> dict[str, str]:
    """The ``ca_file`` and ``proxy`` settings given, checked as the agent will use them."""
    from device_agent.fetcher import AgentFetcher

    settings: dict[str, str] = {}
    if ca_file is not None:
        settings["ca_file"] = str(ca_file.absolute())
    if proxy is not None:
        settings["proxy"] = proxy
    if settings:
        # one line and exit 3 on a bad file or URL
        AgentFetcher(ca_file=settings.get("ca_file", ""), proxy=settings.get("proxy", ""))
    return settings


def _fleet_url(fleet_url: str) -> str:
    """``--fleet-url`` checked as ``--repo-url`` is (``""``: no fleet service)."""
    from device_agent.report import check_fleet_url

    return check_fleet_url(fleet_url, "--fleet-url")


def _architecture(cfg: AgentConfig) -> str:
    """The architecture the device takes variants for, as the agent will resolve it
    (without hardware detection: that is the poll's job)."""
    from device_agent.selection import _profile_architecture, machine_architecture

    if cfg.architecture:
        return cfg.architecture
    if cfg.profile not in ("", "auto"):
        return _profile_architecture(cfg.profile) or machine_architecture()
    return machine_architecture()


def _key_protection(data_dir: Path, protection: str | None, tcti: str | None) -> tuple[str, str]:
    """The key protection and TCTI this enrolment uses (not given: the previous
    enrolment's, else ``file``); with ``tpm`` the TPM must answer now, before anything
    is written."""
    previous = _previous(data_dir) if protection is None or tcti is None else None
    if protection is None:
        protection = previous.key_protection if previous else "file"
    if tcti is None:
        tcti = previous.tpm_tcti if previous else ""
    keyprotect.check_protection(protection, tcti)
    if protection == "tpm":
        keyprotect.Tpm(tcti).check()
    return protection, tcti


def _write_record(
    keys_dir: Path, cfg: AgentConfig, identity: ed25519.Ed25519PrivateKey, recipient: bytes
) -> Path:
    """Write ``DATA/keys/enrolment.json``: what an operator registers with the fleet.

    Signed by the identity key (proof the device holds it); public data only, so
    it is 0644 and may be copied off the device freely.
    """
    record = fleetreport.make_record(
        identity,
        {
            "device_id": cfg.device_id,
            "identity": "ed25519:" + fleetreport.public_raw(identity).hex(),
            "recipient": "x25519:" + recipient.hex(),
            "models": list(cfg.models),
            "channel": cfg.channel,
            "cohort": cfg.cohort,
            "profile": cfg.profile,
            "architecture": _architecture(cfg),
            "agent_version": __version__,
        },
    )
    path = keys_dir / RECORD_NAME
    _atomic.write_bytes(path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return path


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
    passphrase_env: str | None = None,
    ca_file: Path | None = None,
    proxy: str | None = None,
    fleet_url: str | None = None,
    key_protection: str | None = None,
    tpm_tcti: str | None = None,
    at_rest: str | None = None,
) -> Enrolment:
    """Enrol this device; everything written stays inside ``data_dir``.

    ``models`` must name at least one model: the repository has no list of models
    a device could follow by itself, and a device that follows nothing would poll
    for ever and install nothing without saying so.

    Re-enrolling keeps the identity and device id, the hand-set ``[limits]``
    (unless ``limits`` is given) and the other settings of ``config.toml`` that
    enrolment does not set (``ca_file``, ``proxy`` and ``fleet_url`` too, unless
    given, and ``key_protection`` with ``tpm_tcti``); the enrolment record is written
    afresh each time. When the recipient key, trust policy, profile or channel changes,
    the failure marks they may have caused are cleared, so the
    next poll tries those releases again. It holds ``DATA/.lock``: a running
    poll finishes first (restart a running daemon afterwards; it read its
    configuration at start).
    """
    from device_agent.agent import locked

    if not models:
        raise InvalidInputError(
            "name at least one model to follow, e.g. --model digits (repeat for more)"
        )
    config_mod.check_names(models, channel, cohort)  # they become paths the agent deletes
    metadata_url, targets_url = _urls(repo_url)
    warnings = _check_profile(profile)
    try:
        root_bytes = root.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"cannot read the root metadata {root}: {exc}") from None
    given = _open_given(recipient_key, passphrase_env)  # refused before anything is written
    trust_bytes = _read_trust(trust)
    transport = _transport(ca_file, proxy)  # a CA file or proxy the agent could not use
    if fleet_url is not None:
        transport["fleet_url"] = _fleet_url(fleet_url)
    if at_rest is not None:
        if at_rest not in config_mod.AT_REST_MODES:
            raise InvalidInputError(
                f"--at-rest must be one of {', '.join(config_mod.AT_REST_MODES)}, not {at_rest!r}"
            )
        transport["at_rest"] = at_rest
    protection, tcti = _key_protection(data_dir, key_protection, tpm_tcti)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        data_dir.chmod(0o750)  # the agent's user and the applications' group only
    except OSError as exc:  # e.g. enrolling as the agent's user before /var/lib/edgepack exists
        raise InvalidInputError(
            f"cannot prepare the data directory {data_dir}: {exc.strerror or exc}; create it "
            "owned by the agent's user first (packaging/tmpfiles.d/edgepack.conf does) or "
            "enrol as its owner"
        ) from None
    with locked(data_dir):
        previous = _previous(data_dir)
        before = _decides_failures(previous) if previous and previous.metadata_url else None
        try:
            tufclient.pin_root(data_dir, root_bytes)
        except Exception as exc:
            raise InvalidInputError(f"{root} is not TUF root metadata: {exc}") from None
        keys_dir = data_dir / KEYS_DIR
        keys_dir.mkdir(mode=0o700, exist_ok=True)
        identity_key, identity_raw, identity_pub = _identity(keys_dir)
        key_path, pub_path, recipient_raw = _recipient(
            keys_dir, given, passphrase_env, protection, tcti
        )
        if protection == "tpm" or keyprotect.has_storage_key(data_dir):
            keyprotect.ensure_storage_key(data_dir, protection, tcti)  # sealed, or moved back
        settings: dict[str, Any] = {
            "metadata_url": metadata_url,
            "targets_url": targets_url,
            "models": list(dict.fromkeys(models)),
            "channel": channel,
            "cohort": cohort,
            "profile": profile,
            "trust_policy": _trust(keys_dir, trust, trust_bytes),
            "recipient_key": str(key_path),
            "key_protection": protection,
            "tpm_tcti": tcti,
            **transport,
        }
        if previous is not None and previous.metadata_url:
            # Re-enrolment: the same device, its hand-set limits and other settings kept.
            cfg = replace(previous, limits=limits or previous.limits, **settings)
        else:
            device_id = previous.device_id if previous else device_id_for(identity_raw)
            cfg = AgentConfig(
                data_dir=data_dir, device_id=device_id, limits=limits or Limits(), **settings
            )
        config_mod.save(cfg)
        record = _write_record(keys_dir, cfg, identity_key, recipient_raw)
        if cfg.device_id != device_id_for(identity_raw):
            warnings += (
                f"the device id {cfg.device_id} predates its identity key, so the fleet service "
                f"will refuse {record.name}; enrol into a fresh data directory to report to a fleet",
            )
        cleared: tuple[str, ...] = ()
        after = _decides_failures(cfg)
        if before is not None and before != after:
            cleared = _forget_failures(data_dir, profile_changed=before[2] != after[2])
    return Enrolment(
        cfg.device_id,
        pub_path,
        cfg.config_path,
        warnings,
        identity_pub,
        identity_raw.hex(),
        cleared,
        record,
    )
