"""The repository's operations, one function per command.

Each operation takes the working directory, a passphrase source and the time
(``now``, so tests control expiry), holds the publish lock, resolves every key
and check first, and commits once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepack import channel as ch
from edgepack.errors import InvalidInputError, KeyFileError
from edgepack.repo import _channels, _models, _rollouts
from edgepack.repo._keys import (
    PassphraseSource,
    generate_role_key,
    load_public_key,
    no_passphrase,
    open_signer,
)
from edgepack.repo._settings import (
    KEYED_ROLES,
    OPERATORS,
    ROOT,
    SNAPSHOT,
    TARGETS,
    TIMESTAMP,
    RepoPaths,
    Settings,
)
from edgepack.repo._store import LOCK_WAIT_SECONDS, Store, publish_lock, utcnow, write_atomic
from edgepack.repo._tuf import DelegatedRole, Delegations, Metadata, Root, Signer, Targets

if TYPE_CHECKING:
    from edgepack.signing import TrustPolicy

BundleReader = Callable[[Path], _models.BundleInfoLike]


def _read_info(path: Path) -> _models.BundleInfoLike:
    from edgepack.bundle import read_info

    info: _models.BundleInfoLike = read_info(path)
    return info


@dataclass(frozen=True)
class Result:
    """What an operation changed: role → new version, plus a summary."""

    versions: dict[str, int] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def init(
    workdir: Path,
    *,
    passphrase: bytes | None,
    root_keys: int = 1,
    root_threshold: int = 1,
    expiry_days: dict[str, float] | None = None,
    now: datetime | None = None,
) -> Result:
    """Create the role keys and the first metadata of a new repository.

    Keys go to ``WORKDIR/keys`` (PEM, 0600, encrypted with ``passphrase``
    unless it is None); the served tree is ``WORKDIR/public``.
    """
    now = (now or utcnow()).replace(microsecond=0)
    paths = RepoPaths(workdir)
    if not 1 <= root_threshold <= root_keys:
        raise InvalidInputError(
            f"root threshold {root_threshold} must be between 1 and the {root_keys} root keys"
        )
    if paths.settings.exists() or paths.metadata.exists() or any(paths.keys.glob("*.key")):
        raise InvalidInputError(
            f"{workdir} already holds a repository", hint="pick an empty directory"
        )
    settings = Settings()
    for role, days in (expiry_days or {}).items():
        if role not in settings.expiry_days or days <= 0:
            raise InvalidInputError(
                f"bad --expiry {role}={days}",
                hint=f"roles: {', '.join(sorted(settings.expiry_days))}; days > 0",
            )
        settings.expiry_days[role] = days
    settings.root_threshold = root_threshold
    with publish_lock(paths):
        root = Root(
            expires=now + timedelta(days=settings.expiry_days[ROOT]), consistent_snapshot=True
        )
        signers: dict[str, list[Signer]] = {}
        for role in KEYED_ROLES:
            count = root_keys if role == ROOT else 1
            settings.keys[role] = []
            for i in range(count):
                rel = f"keys/{role}-{i + 1}.key" if count > 1 else f"keys/{role}.key"
                signer = generate_role_key(workdir / rel, passphrase)
                settings.keys[role].append(rel)
                signers.setdefault(role, []).append(signer)
                if role != OPERATORS:
                    root.add_key(signer.public_key, role)
        root.roles[ROOT].threshold = root_threshold
        targets = Targets(expires=now)
        op_key = signers[OPERATORS][0].public_key
        targets.delegations = Delegations(
            keys={op_key.keyid: op_key},
            roles={
                OPERATORS: DelegatedRole(
                    OPERATORS,
                    [op_key.keyid],
                    1,
                    terminating=True,
                    paths=list(_channels.OPERATOR_PATHS),
                )
            },
        )
        write_atomic(paths.settings, settings.to_toml().encode())
        paths.metadata.mkdir(parents=True, exist_ok=True)
        paths.targets.mkdir(parents=True, exist_ok=True)
        store = Store(paths, settings, now=now, passphrase=no_passphrase, fresh=True)
        for role, role_signers in signers.items():
            store.use_signers(role, role_signers)
        store.stage_root(Metadata(root), signers[ROOT])
        store.stage(TARGETS, Metadata(targets), signers[TARGETS])
        store.stage(OPERATORS, Metadata(Targets(expires=now)), signers[OPERATORS])
        result = store.commit()
    return Result(result.versions, {"workdir": str(workdir), "keys": settings.keys})


def open_store(
    workdir: Path, passphrase: PassphraseSource, now: datetime | None
) -> tuple[RepoPaths, Settings, Store]:
    """Settings and a fresh transaction for an existing repository."""
    paths = RepoPaths(workdir)
    settings = Settings.load(paths)
    store = Store(
        paths, settings, now=(now or utcnow()).replace(microsecond=0), passphrase=passphrase
    )
    return paths, settings, store


def add_model(
    workdir: Path,
    name: str,
    team_key: Path,
    *,
    passphrase: PassphraseSource,
    key: str | None = None,
    now: datetime | None = None,
) -> Result:
    """Delegate ``models/NAME/*`` to the team key (a PEM public key file)."""
    ch.check_name(name)
    public = load_public_key(team_key)
    paths, _settings, store = open_store(workdir, passphrase, now)
    with publish_lock(paths):
        signers = store.signers(TARGETS, [key] if key else None)
        _models.add_model(store, name, public, signers)
        result = store.commit()
    return Result(
        result.versions, {"model": name, "role": _models.model_role(name), "keyid": public.keyid}
    )


def publish(
    workdir: Path,
    bundles: Sequence[Path],
    *,
    key: str,
    passphrase: PassphraseSource,
    channel: str | None = None,
    operator_key: str | None = None,
    now: datetime | None = None,
    reader: BundleReader | None = None,
    policy: TrustPolicy | None = None,
    lock_wait: float = LOCK_WAIT_SECONDS,
) -> Result:
    """Add bundles as targets under their model team's role (one per variant).

    Each bundle is read (``read_info`` fails on a malformed bundle) and, with
    a trust ``policy``, its producer signature is checked as ``edgepack
    verify`` does, all before the lock is taken; with ``channel`` the new
    versions are also promoted there, all in one commit.
    """
    if not bundles:
        raise InvalidInputError("no bundle to publish")
    if channel is not None:
        ch.check_channel_name(channel)
    read = reader or _read_info
    infos = [read(Path(b)) for b in bundles]
    if policy is not None:
        from edgepack.bundle import check_signature, read_info

        for bundle in bundles:
            check_signature(read_info(Path(bundle)), policy)
    new = [_models.describe_bundle(i) for i in infos]
    by_model: dict[str, list[_models.NewTarget]] = {}
    for info, item in zip(infos, new, strict=True):
        by_model.setdefault(info.name, []).append(item)
    paths, _settings, store = open_store(workdir, passphrase, now)
    with publish_lock(paths, lock_wait):
        signer = _models.team_signer(store, by_model, key)
        added: list[str] = []
        for name, items in by_model.items():
            added += _models.add_targets(store, name, items, signer)
        if channel is not None:
            ops = store.signers(OPERATORS, [operator_key] if operator_key else None)
            docs = [
                _channels.promote(store, i.name, i.version, channel)
                for i in {(i.name, i.version): i for i in infos}.values()
            ]
            _channels.stage_documents(store, _merge(docs), ops)
        result = store.commit()
    return Result(result.versions, {"targets": added, "channel": channel})


def _merge(docs: list[ch.ChannelDocument]) -> list[ch.ChannelDocument]:
    # Several versions of one model promoted at once: the last one wins.
    return list({d.target_path: d for d in docs}.values())


def change_channels(
    workdir: Path,
    build: Callable[[Store], list[ch.ChannelDocument]],
    *,
    passphrase: PassphraseSource,
    key: str | None = None,
    now: datetime | None = None,
    after: Callable[[list[ch.ChannelDocument]], None] | None = None,
) -> Result:
    """Stage the documents ``build`` returns under the operators' role, and commit.

    ``after`` runs under the same lock once they are committed (also when there
    are none), so the rollout records beside the repository move with them.
    """
    paths, _settings, store = open_store(workdir, passphrase, now)
    with publish_lock(paths):
        docs = build(store)
        if not docs:
            if after is not None:
                after([])
            return Result({}, {"documents": []})
        signers = store.signers(OPERATORS, [key] if key else None)
        _channels.stage_documents(store, docs, signers)
        result = store.commit()
        if after is not None:
            after(docs)
    return Result(result.versions, {"documents": [d.to_dict() for d in docs]})


def promote(
    workdir: Path,
    name: str,
    version: str,
    *,
    channel: str,
    passphrase: PassphraseSource,
    rollout: float = 100.0,
    cohorts: Sequence[str] = (),
    key: str | None = None,
    now: datetime | None = None,
    policy: _rollouts.Policy | None = None,
) -> Result:
    """Make ``version`` the current release of ``channel`` (with rollout and cohorts).

    With a rollout ``policy`` the release is recorded for ``fleet watch`` to watch
    (WORKDIR/rollouts.json); without one, any earlier record of the channel goes.
    """
    if policy is not None:
        policy.check(rollout)
    when = (now or utcnow()).timestamp()
    return change_channels(
        workdir,
        lambda s: [
            _channels.promote(s, name, version, channel, rollout=rollout, cohorts=tuple(cohorts))
        ],
        passphrase=passphrase,
        key=key,
        now=now,
        after=lambda docs: _rollouts.record_promote(workdir, docs, policy, when),
    )


def rollback(
    workdir: Path,
    name: str,
    *,
    channel: str,
    passphrase: PassphraseSource,
    to_version: str | None = None,
    key: str | None = None,
    now: datetime | None = None,
) -> Result:
    """Publish a newer channel document naming an older release (ends a watched rollout)."""
    when = (now or utcnow()).timestamp()
    return change_channels(
        workdir,
        lambda s: [_channels.rollback(s, name, channel, to_version)],
        passphrase=passphrase,
        key=key,
        now=now,
        after=lambda docs: _rollouts.record_ended(
            workdir, name, [d.channel for d in docs], None, "rolled back by hand", when
        ),
    )


def revoke(
    workdir: Path,
    name: str,
    version: str,
    *,
    passphrase: PassphraseSource,
    key: str | None = None,
    now: datetime | None = None,
) -> Result:
    """List ``version`` as revoked in every channel of the model (ends its watched rollouts)."""
    when = (now or utcnow()).timestamp()
    return change_channels(
        workdir,
        lambda s: _channels.revoke(s, name, version),
        passphrase=passphrase,
        key=key,
        now=now,
        after=lambda docs: _rollouts.record_ended(
            workdir, name, [d.channel for d in docs], version, "revoked by hand", when
        ),
    )


def refresh(
    workdir: Path,
    *,
    passphrase: PassphraseSource,
    now: datetime | None = None,
    force: bool = False,
) -> Result:
    """Re-sign snapshot and timestamp when they are inside their refresh window.

    Nothing is due → nothing is written and no key is opened (so a timer can
    run it often without a passphrase prompt).
    """
    paths, settings, store = open_store(workdir, passphrase, now)
    with publish_lock(paths):
        snap_left = store.snapshot().signed.expires - store.now
        ts_left = store.timestamp().signed.expires - store.now
        snap_due = force or snap_left < timedelta(days=settings.refresh_days[SNAPSHOT])
        ts_due = snap_due or ts_left < timedelta(days=settings.refresh_days[TIMESTAMP])
        if not ts_due:
            return Result({}, {"refreshed": []})
        result = store.commit(force_snapshot=snap_due, force_timestamp=True)
    return Result(result.versions, {"refreshed": sorted(result.versions)})


def rotate_key(
    workdir: Path,
    role: str,
    *,
    passphrase: PassphraseSource,
    new_passphrase: bytes | None,
    replacements: Sequence[tuple[str, Path]] = (),
    now: datetime | None = None,
) -> Result:
    """Replace the key(s) of ``role`` with new ones, following TUF's root chain.

    A new root version lists the new key and is signed by the old root keys
    (and, when root itself rotates, the new ones too), so devices that trust
    the old root accept it; metadata signed by the old key is rejected after.
    The old key files move to ``keys/retired/``. By default as many new
    Ed25519 keys are generated as the role had; ``replacements`` instead names
    existing keys as (signer URI or PEM path, public key PEM) pairs — the way
    to move a role onto an HSM or a cloud KMS.
    """
    if role not in KEYED_ROLES:
        raise InvalidInputError(
            f"cannot rotate role {role!r} here",
            hint=f"roles: {', '.join(KEYED_ROLES)}; a model team's key changes with add-model",
        )
    paths, settings, store = open_store(workdir, passphrase, now)
    with publish_lock(paths):
        old_root_signers = store.signers(ROOT)
        # read (and verify) what the old keys signed before the new root replaces them
        store.snapshot()
        store.role(TARGETS)
        store.role(OPERATORS)
        old_specs = list(settings.keys.get(role, []))
        root_md: Metadata[Root] = deepcopy(store.root())
        root = root_md.signed
        if replacements:
            new_specs = [spec for spec, _public in replacements]
            new_signers = [
                open_signer(
                    spec,
                    base=workdir,
                    passphrase=passphrase,
                    trusted=[load_public_key(public)],
                    role=role,
                )
                for spec, public in replacements
            ]
        else:
            count = len(old_specs)
            stamp = root.version + 1
            new_specs = [
                f"keys/{role}-v{stamp}-{i + 1}.key" if count > 1 else f"keys/{role}-v{stamp}.key"
                for i in range(count)
            ]
            for spec in new_specs:
                if (workdir / spec).exists():
                    raise KeyFileError(
                        f"{workdir / spec} already exists", hint="remove it and retry"
                    )
            new_signers = [generate_role_key(workdir / spec, new_passphrase) for spec in new_specs]
        threshold = root.roles[ROOT].threshold if role == ROOT else 1
        if len({s.public_key.keyid for s in new_signers}) < threshold:
            raise KeyFileError(f"role {role!r} needs at least {threshold} distinct new keys")
        new_keys = [s.public_key for s in new_signers]
        root.version += 1
        root.expires = store.now + timedelta(days=settings.expiry_days[ROOT])
        if role == OPERATORS:
            if len(new_keys) != 1:
                raise KeyFileError("the operators' role takes exactly one key")
            operators = deepcopy(store.role(OPERATORS))  # load while the old key is trusted
            from edgepack.repo._envelopes import Rotation

            envelopes = Rotation(store)  # the envelopes role follows the operators' key
            targets = deepcopy(store.role(TARGETS))
            delegations = targets.signed.delegations
            assert delegations is not None and delegations.roles is not None
            for keyid in delegations.roles[OPERATORS].keyids:
                delegations.keys.pop(keyid, None)
            delegations.keys[new_keys[0].keyid] = new_keys[0]
            delegations.roles[OPERATORS].keyids = [new_keys[0].keyid]
            envelopes.apply(delegations, new_signers[0])
            store.stage(TARGETS, targets, store.signers(TARGETS))
            store.stage(OPERATORS, operators, new_signers)
        else:
            for keyid in list(root.roles[role].keyids):
                root.revoke_key(keyid, role)
            for key in new_keys:
                root.add_key(key, role)
            # the root chain: the old root keys vouch for the new root
            store.stage_root(root_md, old_root_signers + (new_signers if role == ROOT else []))
            if role == TARGETS:
                store.stage(TARGETS, deepcopy(store.role(TARGETS)), new_signers)
        store.use_signers(role, new_signers)
        result = store.commit(force_snapshot=role == SNAPSHOT, force_timestamp=True)
        settings.keys[role] = new_specs
        write_atomic(paths.settings, settings.to_toml().encode())
        retired = paths.keys / "retired"
        retired.mkdir(exist_ok=True, mode=0o700)
        for spec in old_specs:
            old = workdir / spec
            for file in (old, old.with_name(old.name + ".pub")):
                if file.exists():
                    file.replace(retired / file.name)
    return Result(
        result.versions, {"role": role, "keys": new_specs, "keyids": [k.keyid for k in new_keys]}
    )


def resign(
    workdir: Path,
    role: str,
    *,
    passphrase: PassphraseSource,
    key: str | None = None,
    now: datetime | None = None,
) -> Result:
    """Sign a new version of ``role`` with a fresh expiry and no other change.

    For roles that are not re-signed by daily work: root and targets (by the
    key ceremony), operators, and a model team's role with all its bins
    (``model-NAME``, with the team's ``key``).
    """
    paths, settings, store = open_store(workdir, passphrase, now)
    specs = [key] if key else None
    with publish_lock(paths):
        store.snapshot()
        store.role(TARGETS)
        if role == ROOT:
            root_md: Metadata[Root] = deepcopy(store.root())
            signers = store.signers(ROOT, specs)
            root_md.signed.version += 1
            root_md.signed.expires = store.now + timedelta(days=settings.expiry_days[ROOT])
            store.stage_root(root_md, signers)
        elif role in (TARGETS, OPERATORS):
            store.stage(role, deepcopy(store.role(role)), store.signers(role, specs))
        elif role in (SNAPSHOT, TIMESTAMP):
            if specs:
                store.use_signers(role, store.signers(role, specs))
        elif role == "envelopes":
            from edgepack.repo._envelopes import resign as resign_envelopes

            resign_envelopes(store, key)
        elif role.startswith("model-"):
            name = role[len("model-") :]
            if not key:
                raise KeyFileError(f"re-signing {role} needs the team's key", hint="pass --key")
            signer = _models.team_signer(store, [name], key)
            if not store.has_role(role):
                raise InvalidInputError(f"model {name!r} has no published release yet")
            store.stage(role, deepcopy(store.role(role)), [signer])
            for bin_name in _models.bin_names(store, name):
                store.stage(bin_name, deepcopy(store.role(bin_name, parent=role)), [signer])
        else:
            raise InvalidInputError(f"unknown role {role!r}", hint="see `edgepack repo status`")
        result = store.commit(force_snapshot=role != TIMESTAMP, force_timestamp=True)
    return Result(result.versions, {"resigned": role})
