"""The ``envelopes`` role: per-device key envelopes in hash bins, and revoked devices.

Top-level targets delegates ``keys/*`` and ``keys/*/*/*`` (terminating) to the
role ``envelopes``, signed by the operators' key. The role lists one target of
its own, ``keys/revoked.json`` (:mod:`edgepack.envelope`), and delegates every
other path through a succinct hash-bin delegation (TAP 15) to
``envelopes~bin-XXX`` roles signed by the same key. A device looking up
``keys/NAME/VERSION/DEVICE_ID.json`` fetches ``envelopes.json`` and the one bin
its path hashes into, never the others.

Bin count: 2**b bins with b the smallest number leaving at most
:data:`PER_BIN` (256) envelopes per bin on average, at least 2 bins. A device's
metadata for its envelope is the snapshot (one ~50-byte entry per bin) plus one
bin (~140 bytes per envelope), so the sum is smallest when the two are about
equal: at 100,000 envelopes that is near 500 bins, and b = 9 (512 bins, 195 per
bin) is what 256 gives. The role is re-binned (every bin re-signed) when the
envelopes outgrow it; bins never shrink, and bins of an old layout whose names
the new one does not reuse stay listed in the snapshot (TUF devices refuse a
snapshot that drops a role they saw).

The envelopes role follows the operators' key: when it is missing from
top-level targets, or names another key than the operators' role (after
``keys rotate operators``), the next change re-delegates it, which re-signs
top-level targets with the targets key from repo.toml.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import x25519

from edgepack import envelope as env
from edgepack.errors import EdgepackError, InvalidInputError
from edgepack.repo._keys import PassphraseSource
from edgepack.repo._models import bundle_target_path, iter_model_targets, model_names, model_role
from edgepack.repo._ops import Result, open_store
from edgepack.repo._settings import OPERATORS, SNAPSHOT, TARGETS, TIMESTAMP
from edgepack.repo._store import LOCK_WAIT_SECONDS, Store, publish_lock
from edgepack.repo._tuf import (
    DelegatedRole,
    Delegations,
    Metadata,
    Signer,
    SuccinctRoles,
    TargetFile,
    Targets,
)

ENVELOPES = "envelopes"
ENVELOPE_PATHS = ["keys/*", "keys/*/*/*"]
"""``keys/revoked.json`` and ``keys/NAME/VERSION/DEVICE_ID.json`` (TUF patterns match
one path segment per ``*``)."""
BIN_PREFIX = "envelopes~bin"
PER_BIN = 256
"""Average envelopes per bin the bin count aims at (see the module docstring)."""
MAX_BITS = 16


def bits_for(count: int) -> int:
    """Hash-bin bits for ``count`` envelopes: at most :data:`PER_BIN` per bin on average."""
    return min(MAX_BITS, max(1, math.ceil(math.log2(max(2.0, count / PER_BIN)))))


@dataclass(frozen=True)
class Device:
    """A device to wrap for: its id, recipient public key and enrolled profile."""

    device_id: str
    recipient: x25519.X25519PublicKey
    profile: str | None = None


@dataclass(frozen=True)
class Release:
    """One bundle's content key and identity, recovered by the caller."""

    name: str
    version: str
    profile: str | None
    bundle_sha256: str
    info: bytes
    content_key: bytes = field(repr=False)


@dataclass
class _Role:
    """The envelopes role and all its bins, loaded (and verified) for one change."""

    store: Store
    top: Metadata[Targets]
    bins: dict[str, Metadata[Targets]]
    touched: set[str] = field(default_factory=set)
    rebuild: bool = False
    files: list[tuple[TargetFile, bytes]] = field(default_factory=list)

    @classmethod
    def load(cls, store: Store) -> _Role:
        if not store.has_role(ENVELOPES):
            return cls(store, Metadata(Targets(expires=store.now)), {})
        top = deepcopy(store.role(ENVELOPES))
        bins: dict[str, Metadata[Targets]] = {}
        succinct = _succinct(top)
        if succinct is not None:
            for name in succinct.get_roles():
                if store.has_role(name):
                    # no copy: the store is this one change's, and a bin may be big
                    bins[name] = store.role(name, parent=ENVELOPES)
        return cls(store, top, bins)

    @property
    def succinct(self) -> SuccinctRoles | None:
        return _succinct(self.top)

    def revoked(self) -> dict[str, env.Revocation]:
        info = self.top.signed.targets.get(env.REVOKED_PATH)
        return {} if info is None else env.parse_revoked(self.store.read_target(info))

    def set_revoked(self, revoked: dict[str, env.Revocation]) -> None:
        data = env.revoked_to_bytes(revoked)
        info = TargetFile.from_data(env.REVOKED_PATH, data)
        self.top.signed.targets[env.REVOKED_PATH] = info
        self.files.append((info, data))

    def find(self, path: str) -> TargetFile | None:
        succinct = self.succinct
        if succinct is None:
            return None
        md = self.bins.get(succinct.get_role_for_target(path))
        return None if md is None else md.signed.targets.get(path)

    def count(self) -> int:
        return sum(len(md.signed.targets) for md in self.bins.values())

    def add(self, new: dict[str, tuple[TargetFile, bytes]]) -> None:
        """Put the envelopes in their bins, re-binning first when they would overflow."""
        fresh = sum(1 for p in new if self.find(p) is None)
        succinct = self.succinct
        bits = bits_for(self.count() + fresh)
        if succinct is None or bits > succinct.bit_length:
            self._rebin(max(bits, 0 if succinct is None else succinct.bit_length))
        succinct = self.succinct
        assert succinct is not None
        for path, (info, data) in new.items():
            holder = succinct.get_role_for_target(path)
            self.bins[holder].signed.targets[path] = info
            self.touched.add(holder)
            self.files.append((info, data))

    def withdraw(self, device_id: str) -> list[str]:
        """Remove every envelope of ``device_id``; return their paths."""
        gone = []
        suffix = f"/{device_id}.json"
        for name, md in self.bins.items():
            for path in [p for p in md.signed.targets if p.endswith(suffix)]:
                del md.signed.targets[path]
                gone.append(path)
                self.touched.add(name)
        return sorted(gone)

    def _rebin(self, bits: int) -> None:
        everything = {p: i for md in self.bins.values() for p, i in md.signed.targets.items()}
        succinct = SuccinctRoles([], 1, bits, BIN_PREFIX)
        self.top.signed.delegations = Delegations(keys={}, succinct_roles=succinct)
        bins = {b: Metadata(Targets(expires=self.store.now)) for b in succinct.get_roles()}
        for path, info in everything.items():
            bins[succinct.get_role_for_target(path)].signed.targets[path] = info
        # Bins of the old layout that the new one does not reuse (their names change
        # width at 5, 9 and 13 bits) stay listed in the snapshot as they are: TUF
        # devices refuse a snapshot that drops a role the previous one listed.
        self.bins = bins
        self.rebuild = True

    def stage(self, signer: Signer) -> None:
        """Stage the role (delegating to ``signer``'s key) and every changed bin."""
        if self.succinct is None:
            self._rebin(1)
        succinct = self.succinct
        assert succinct is not None and self.top.signed.delegations is not None
        key = signer.public_key
        if succinct.keyids != [key.keyid]:
            succinct.keyids = [key.keyid]
            self.top.signed.delegations.keys = {key.keyid: key}
            self.rebuild = True
        # the keys of snapshot and timestamp open before the first file is written
        self.store.signers(SNAPSHOT)
        self.store.signers(TIMESTAMP)
        write_batch(self.store.paths.targets, self.files)
        self.store.stage(ENVELOPES, self.top, [signer])
        for name in self.bins if self.rebuild else sorted(self.touched):
            self.store.stage(name, self.bins[name], [signer])
            self.store.set_parent(name, ENVELOPES)


def write_batch(root: Path, files: Sequence[tuple[TargetFile, bytes]]) -> None:
    """Write many small target files under their hash-prefixed names, then flush once.

    The store writes each target through a temporary file with two ``fsync``
    calls, which at 100,000 envelopes is minutes. Here each file is written
    straight under its name and one ``syncfs`` of the tree's filesystem makes
    them all durable before any metadata that names them is written. That is
    safe because the names are new and content-addressed (each envelope holds
    fresh HPKE randomness): no metadata names a file before it is whole on disk,
    so a crash or a failure leaves only unreferenced files, and no reader ever
    sees a file change.
    """
    made: set[Path] = set()
    for info, data in files:
        for rel in info.get_prefixed_paths():
            dest = root / rel
            if dest.parent not in made:
                dest.parent.mkdir(parents=True, exist_ok=True)
                made.add(dest.parent)
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                os.fchmod(fd, 0o644)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
    if files:
        _sync_filesystem(root)


def _sync_filesystem(path: Path) -> None:
    """``syncfs(2)`` on the filesystem holding ``path`` (``sync(2)`` where it is missing)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    syncfs = getattr(libc, "syncfs", None)
    if syncfs is None:  # pragma: no cover - not Linux
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def _succinct(md: Metadata[Targets]) -> SuccinctRoles | None:
    delegations = md.signed.delegations
    return None if delegations is None else delegations.succinct_roles


def _operators_signer(store: Store, key: str | None) -> Signer:
    """The operators' key (``key`` or repo.toml's), checked against the operators' role."""
    return store.signers(OPERATORS, [key] if key else None)[0]


def _delegate(store: Store, signer: Signer) -> bool:
    """Make top-level targets delegate the envelopes role to ``signer``'s key.

    Returns whether top-level targets had to change (it is then staged, signed
    with the targets key of repo.toml).
    """
    targets = store.role(TARGETS)
    delegations = targets.signed.delegations
    if delegations is None or delegations.roles is None:
        raise InvalidInputError("top-level targets metadata has no delegations")
    key = signer.public_key
    current = delegations.roles.get(ENVELOPES)
    if current is not None and current.keyids == [key.keyid]:
        return False
    staged = deepcopy(targets)
    delegations = staged.signed.delegations
    assert delegations is not None and delegations.roles is not None
    if current is not None:
        for keyid in current.keyids:
            used = any(keyid in r.keyids for n, r in delegations.roles.items() if n != ENVELOPES)
            if not used:
                delegations.keys.pop(keyid, None)
    delegations.keys[key.keyid] = key
    delegations.roles[ENVELOPES] = DelegatedRole(
        ENVELOPES, [key.keyid], 1, terminating=True, paths=list(ENVELOPE_PATHS)
    )
    store.stage(TARGETS, staged, store.signers(TARGETS))
    return True


def _published_sha256(store: Store, release: Release) -> None:
    """Refuse a bundle the repository does not serve (or serves with other bytes)."""
    path = bundle_target_path(release.name, release.version, release.profile)
    if release.name not in model_names(store) or not store.has_role(model_role(release.name)):
        raise InvalidInputError(
            f"model {release.name!r} has nothing published in this repository",
            hint="publish the bundle first: edgepack publish BUNDLE --repo WORKDIR --key TEAM.key",
        )
    found = dict(iter_model_targets(store, release.name)).get(path)
    if found is None:
        raise InvalidInputError(
            f"{path} is not published in this repository",
            hint="publish the bundle first: edgepack publish BUNDLE --repo WORKDIR --key TEAM.key",
        )
    if found.hashes.get("sha256") != release.bundle_sha256:
        raise InvalidInputError(
            f"the bundle given is not the one published as {path} (other bytes)",
            hint="give the very file that was published",
        )


def _pick(releases: Sequence[Release], device: Device) -> Release | None:
    if len(releases) == 1:
        return releases[0]
    by_profile = {r.profile: r for r in releases}
    return by_profile.get(device.profile) or by_profile.get(None)


def wrap(
    workdir: Path,
    releases: Sequence[Release],
    devices: Iterable[Device],
    *,
    passphrase: PassphraseSource,
    key: str | None = None,
    now: datetime | None = None,
    lock_wait: float = LOCK_WAIT_SECONDS,
) -> Result:
    """Publish one envelope per device for a release (one bundle, or one per profile).

    With several bundles (variants of one release) a device gets the one of its
    enrolled profile, else the one packed without a profile. Revoked devices,
    devices given twice and devices whose envelope already holds their current
    key are skipped, each with the reason in ``summary["skipped"]``. One commit.
    """
    if not releases:
        raise InvalidInputError("no bundle to wrap keys for")
    if len({(r.name, r.version) for r in releases}) != 1:
        raise InvalidInputError(
            "the bundles are not all of one release", hint="wrap one release at a time"
        )
    if len({r.profile for r in releases}) != len(releases):
        raise InvalidInputError("two bundles of the same profile were given")
    name, version = releases[0].name, releases[0].version
    paths, _settings, store = open_store(workdir, passphrase, now)
    with publish_lock(paths, lock_wait):
        for given in releases:
            _published_sha256(store, given)
        role = _Role.load(store)
        signer = _operators_signer(store, key)
        revoked = role.revoked()
        skipped: list[dict[str, str]] = []
        new: dict[str, tuple[TargetFile, bytes]] = {}
        seen: set[str] = set()
        for device in devices:
            device_id = env.check_device_id(device.device_id)
            if device_id in seen:
                skipped.append({"device_id": device_id, "reason": "given twice"})
                continue
            seen.add(device_id)
            if device_id in revoked:
                why = revoked[device_id]
                skipped.append(
                    {
                        "device_id": device_id,
                        "reason": f"revoked {why.time}" + (f": {why.reason}" if why.reason else ""),
                    }
                )
                continue
            picked = _pick(releases, device)
            if picked is None:
                skipped.append(
                    {
                        "device_id": device_id,
                        "reason": f"no bundle of profile {device.profile or 'any'} was given",
                    }
                )
                continue
            release = picked
            path = env.envelope_target_path(name, version, device_id)
            existing = role.find(path)
            if existing is not None and _holds(store, existing, device, release):
                skipped.append({"device_id": device_id, "reason": "already wrapped"})
                continue
            sealed = env.make_envelope(
                release.content_key,
                device.recipient,
                name=name,
                version=version,
                profile=release.profile,
                bundle_sha256=release.bundle_sha256,
                device_id=device_id,
                info=release.info,
            )
            data = sealed.to_bytes()
            new[path] = (TargetFile.from_data(path, data), data)
        if not new:
            return Result({}, {"wrapped": [], "skipped": skipped, "bins": _bins(role)})
        role.add(new)
        _delegate(store, signer)
        role.stage(signer)
        result = store.commit()
    return Result(
        result.versions, {"wrapped": sorted(new), "skipped": skipped, "bins": _bins(role)}
    )


def _holds(store: Store, info: TargetFile, device: Device, release: Release) -> bool:
    """Whether a published envelope already wraps this release's bundle for this key."""
    from edgepack.crypto import recipient_key_id

    try:
        old = env.parse_envelope(store.read_target(info))
    except EdgepackError:
        return False
    return (
        old.key_id == recipient_key_id(device.recipient)
        and old.bundle_sha256 == release.bundle_sha256
    )


def _bins(role: _Role) -> int:
    succinct = role.succinct
    return 0 if succinct is None else succinct.number_of_bins


def revoke_device(
    workdir: Path,
    device_id: str,
    *,
    reason: str = "",
    passphrase: PassphraseSource,
    key: str | None = None,
    now: datetime | None = None,
) -> Result:
    """List ``device_id`` in ``keys/revoked.json`` and withdraw its published envelopes.

    The device keeps what it has installed; it gets no key for anything new.
    Revoking a device twice keeps the first record and changes nothing.
    """
    env.check_device_id(device_id)
    paths, _settings, store = open_store(workdir, passphrase, now)
    with publish_lock(paths):
        role = _Role.load(store)
        signer = _operators_signer(store, key)
        revoked = role.revoked()
        already = device_id in revoked
        if not already:
            when = store.now.isoformat().replace("+00:00", "Z")
            revoked[device_id] = env.Revocation(device_id, when, reason)
            role.set_revoked(revoked)
        withdrawn = role.withdraw(device_id)
        summary = {
            "device_id": device_id,
            "revoked": True,
            "already": already,
            "time": revoked[device_id].time,
            "reason": revoked[device_id].reason,
            "withdrawn": withdrawn,
        }
        if already and not withdrawn:
            return Result({}, summary)
        _delegate(store, signer)
        role.stage(signer)
        result = store.commit()
    return Result(result.versions, summary)


def revoked_devices(workdir: Path, now: datetime | None = None) -> dict[str, env.Revocation]:
    """The devices the repository lists as revoked (read-only; opens no key)."""
    from edgepack.repo._keys import no_passphrase

    _paths, _settings, store = open_store(workdir, no_passphrase, now)
    return _Role.load(store).revoked()


# ----------------------------------------------------------------------------- device lists


def load_devices(path: Path) -> tuple[list[Device], list[dict[str, str]]]:
    """Devices from enrolment records: one record file, a directory of them, or a JSON list.

    A directory is searched for ``*.json`` files (recursively, so a tree of
    ``DEVICE/keys/enrolment.json`` copies works). Every record's signature and
    device id are checked (:func:`edgepack.fleetreport.parse_record`); a record
    with no recipient key is skipped with the reason.
    """
    from edgepack import fleetreport

    if path.is_dir():
        files = sorted(p for p in path.rglob("*.json") if p.is_file())
        if not files:
            raise InvalidInputError(
                f"{path} holds no enrolment record (*.json)",
                hint="copy each device's DATA/keys/enrolment.json there",
            )
        raw = [(str(p), _read(p, fleetreport.MAX_RECORD_BYTES)) for p in files]
    else:
        data = _read(path, 1 << 30)
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, ValueError):
            raise InvalidInputError(
                f"{path} is not JSON",
                hint="give an enrolment record, a directory of them, or a JSON list of them",
            ) from None
        if isinstance(doc, list):
            raw = [
                (f"{path} entry {i + 1}", json.dumps(entry).encode()) for i, entry in enumerate(doc)
            ]
        else:
            raw = [(str(path), data)]
    devices: list[Device] = []
    skipped: list[dict[str, str]] = []
    for where, data in raw:
        try:
            record = fleetreport.parse_record(data)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{where}: {exc.message}", hint=exc.hint) from None
        recipient = str(record["recipient"])
        if not recipient:
            skipped.append(
                {"device_id": record["device_id"], "reason": "enrolled without a recipient key"}
            )
            continue
        public = x25519.X25519PublicKey.from_public_bytes(
            bytes.fromhex(recipient.removeprefix("x25519:"))
        )
        profile = str(record["profile"]) or None
        devices.append(Device(record["device_id"], public, None if profile == "auto" else profile))
    return devices, skipped


def _read(path: Path, limit: int) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise InvalidInputError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise InvalidInputError(f"{path} is larger than {limit} bytes")
    return data


def release_of(bundle: Path, open_with: x25519.X25519PrivateKey) -> Release:
    """A bundle's identity and content key, unwrapped from its own recipient list.

    ``open_with`` is a recipient private key the bundle was packed for (the
    publisher's or a group's); any other key is a clear error.
    """
    import hashlib

    from edgepack.bundle import read_info
    from edgepack.bundle.metadata import hpke_info
    from edgepack.crypto import recipient_key_id, unwrap_key
    from edgepack.errors import VerificationError

    info = read_info(bundle)
    identity = hpke_info(info.name, info.version, info.profile, info.encryption)
    key_id = recipient_key_id(open_with.public_key())
    if key_id not in {r.key_id for r in info.encryption.recipients}:
        raise VerificationError(
            f"--open-with key (id {key_id}) is not a recipient of {bundle}",
            hint="give the publisher's or group's recipient key the bundle was packed for",
        )
    content_key = unwrap_key(list(info.encryption.recipients), open_with, identity)
    digest = hashlib.sha256()
    with open(bundle, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return Release(info.name, info.version, info.profile, digest.hexdigest(), identity, content_key)


class Rotation:
    """Moves the envelopes role onto the operators' new key inside ``keys rotate operators``.

    Made before the old key leaves top-level targets (the role and its bins are
    loaded and verified while it is still trusted); :meth:`apply` then delegates the
    role to the new key in the targets metadata being staged and re-signs the role
    and every bin with it, in the same commit, so devices never see a gap.
    """

    def __init__(self, store: Store) -> None:
        self._role = _Role.load(store) if store.has_role(ENVELOPES) else None

    def apply(self, delegations: Delegations, signer: Signer) -> None:
        """Point ``delegations`` (the staged top-level targets') at ``signer`` and re-sign."""
        if self._role is None or delegations.roles is None or ENVELOPES not in delegations.roles:
            return
        key = signer.public_key
        delegations.keys[key.keyid] = key
        delegations.roles[ENVELOPES].keyids = [key.keyid]
        self._role.stage(signer)


def resign(store: Store, key: str | None) -> None:
    """Stage a new version of the envelopes role and every bin, no other change
    (``repo refresh --role envelopes``), signed by the operators' key."""
    if not store.has_role(ENVELOPES):
        raise InvalidInputError(
            "the repository has no key envelopes yet", hint="see `edgepack keys wrap`"
        )
    role = _Role.load(store)
    role.rebuild = True
    role.stage(_operators_signer(store, key))


def prune(
    workdir: Path,
    name: str,
    versions: Sequence[str],
    *,
    passphrase: PassphraseSource,
    key: str | None = None,
    now: datetime | None = None,
) -> Result:
    """Withdraw every envelope of these releases of ``name``.

    Envelopes of every wrapped release stay until pruned, so bins and the snapshot
    would grow with releases × devices; pruning what no channel offers keeps the
    bins at the size of the releases kept. The bin count itself never shrinks
    (TUF devices refuse a snapshot that drops a role they saw). A release a channel still names (current or
    previous, and not revoked: a device may still need its key) is refused.
    """
    from edgepack.repo._channels import documents

    if not versions:
        raise InvalidInputError("no version to prune")
    for version in versions:
        env.envelope_target_path(name, version, "dev-" + "0" * 20)  # checks name and version
    paths, _settings, store = open_store(workdir, passphrase, now)
    with publish_lock(paths):
        for doc in documents(store):
            if doc.model != name:
                continue
            offered = ((doc.current,) if doc.current else ()) + doc.previous
            named = [r.version for r in offered if r.version not in doc.revoked]
            for version in versions:
                if version in named:
                    raise InvalidInputError(
                        f"{name} {version} is still named by channel {doc.channel}; "
                        "devices may still need its key",
                        hint="prune releases no channel offers any more",
                    )
        role = _Role.load(store)
        signer = _operators_signer(store, key)
        prefixes = tuple(f"keys/{name}/{v}/" for v in versions)
        removed = 0
        for holder, md in role.bins.items():
            gone = [p for p in md.signed.targets if p.startswith(prefixes)]
            for path in gone:
                del md.signed.targets[path]
            if gone:
                removed += len(gone)
                role.touched.add(holder)
        summary: dict[str, Any] = {
            "model": name,
            "versions": list(versions),
            "withdrawn": removed,
            "bins": _bins(role),
        }
        if not removed:
            return Result({}, summary)
        _delegate(store, signer)
        role.stage(signer)
        result = store.commit()
    return Result(result.versions, summary)
