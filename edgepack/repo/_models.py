"""Model team roles: delegation, publishing bundles, and hash bins at scale.

Each model has a delegated role ``model-NAME`` trusted for ``models/NAME/*``
only, signed by the model team's key, which the repository never holds. While
the model has few releases its role lists the bundles itself; when a role
grows past ``max_per_bin`` targets it becomes a succinct hash-bin delegation
(TAP 15) to ``model-NAME~bin-XX`` roles signed by the same key, so a device
downloads one small bin instead of every release ever published.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from edgepack.bundle.metadata import PayloadFile
from edgepack.channel import check_name, check_version
from edgepack.errors import InvalidInputError, KeyFileError
from edgepack.repo._keys import open_signer
from edgepack.repo._settings import TARGETS
from edgepack.repo._store import Store, targets_of
from edgepack.repo._tuf import (
    DelegatedRole,
    Delegations,
    Key,
    Metadata,
    Signer,
    SuccinctRoles,
    TargetFile,
    Targets,
)


class BundleInfoLike(Protocol):
    """What publishing needs to know of a bundle (``edgepack.bundle.BundleInfo``)."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def profile(self) -> str | None: ...
    @property
    def architectures(self) -> tuple[str, ...]: ...
    @property
    def path(self) -> Path: ...
    @property
    def manifest(self) -> tuple[PayloadFile, ...]: ...


@dataclass(frozen=True)
class NewTarget:
    """A bundle ready to become a target: its TUF path, description and bytes."""

    info: TargetFile
    source: Path | bytes


def model_role(name: str) -> str:
    """The delegated role of a model team."""
    return f"model-{check_name(name)}"


def bin_prefix(name: str) -> str:
    """Succinct bin name prefix; '~' cannot occur in a model name, so no clash."""
    return f"model-{name}~bin"


def model_paths(name: str) -> list[str]:
    """The only target paths a model's team may sign."""
    return [f"models/{name}/*"]


def bundle_target_path(name: str, version: str, profile: str | None) -> str:
    """``models/NAME/NAME-VERSION-PROFILE.epk`` (``any`` when packed without a profile)."""
    return f"models/{name}/{name}-{version}-{profile or 'any'}.epk"


def describe_bundle(info: BundleInfoLike) -> NewTarget:
    """A TUF target for a bundle, with edgepack's custom metadata."""
    name = check_name(info.name)
    version = check_version(info.version)
    profile = None if info.profile is None else check_name(info.profile, "profile name")
    path = bundle_target_path(name, version, profile)
    target = TargetFile.from_file(path, str(info.path))
    target.unrecognized_fields["custom"] = {
        "name": name,
        "version": version,
        "profile": profile,
        "architectures": list(info.architectures),
        # The payload's files in manifest order: a device hashes each as it downloads.
        "payload": [{"path": f.path, "size": f.size} for f in info.manifest],
    }
    return NewTarget(target, Path(info.path))


def add_model(store: Store, name: str, team_key: Key, targets_signers: list[Signer]) -> None:
    """Delegate ``models/NAME/*`` to ``team_key`` (terminating) in top-level targets."""
    role = model_role(name)
    targets = store.role(TARGETS)
    delegations = targets.signed.delegations
    if delegations is None or delegations.roles is None:
        raise InvalidInputError("top-level targets metadata has no delegations")
    if role in delegations.roles:
        raise InvalidInputError(
            f"model {name!r} is already in the repository",
            hint="use `edgepack keys rotate` to change a key, or pick another name",
        )
    staged = _copy(targets)
    delegations = staged.signed.delegations
    assert delegations is not None and delegations.roles is not None
    delegations.keys[team_key.keyid] = team_key
    delegations.roles[role] = DelegatedRole(
        role, [team_key.keyid], 1, terminating=True, paths=model_paths(name)
    )
    # The team's role metadata appears with its first publish, signed by its own key.
    store.stage(TARGETS, staged, targets_signers)


def team_signer(store: Store, names: Iterable[str], spec: str) -> Signer:
    """Open the team key ``spec`` and check every model in ``names`` delegates to it."""
    signer: Signer | None = None
    for name in sorted(set(names)):
        role = model_role(name)
        targets = store.role(TARGETS).signed
        if (
            targets.delegations is None
            or not targets.delegations.roles
            or (role not in targets.delegations.roles)
        ):
            raise InvalidInputError(
                f"unknown model {name!r}",
                hint=f"add it first: edgepack repo add-model WORKDIR {name} --key TEAM.pub",
            )
        delegated = targets.delegations.roles[role]
        trusted = [targets.delegations.keys[k] for k in delegated.keyids]
        try:
            candidate = open_signer(
                spec, base=None, passphrase=store.passphrase, trusted=trusted, role=role
            )
        except KeyFileError as exc:
            raise KeyFileError(
                f"this key cannot publish model {name!r}: {exc.message}",
                hint="use the key of the team that owns this model",
            ) from None
        signer = signer or candidate
    if signer is None:
        raise InvalidInputError("no bundle to publish")
    return signer


def add_targets(store: Store, name: str, new: list[NewTarget], signer: Signer) -> list[str]:
    """Add bundles of one model under its role or bins; refuse duplicates.

    Returns the target paths added. Re-bins the role when it grows.
    """
    role = model_role(name)
    top = store.role(role) if store.has_role(role) else Metadata(Targets(expires=store.now))
    paths_seen: set[str] = set()
    touched: dict[str, Metadata[Targets]] = {}
    for item in new:
        path = item.info.path
        if path in paths_seen:
            raise InvalidInputError(f"{path} is given twice", hint="publish each bundle once")
        paths_seen.add(path)
        holder = _holder_for(store, role, top, path)
        md = touched.get(holder)
        if md is None:
            md = _copy(store.role(holder, parent=role) if holder != role else top)
            touched[holder] = md
        if path in md.signed.targets:
            custom = item.info.custom or {}
            raise InvalidInputError(
                f"{custom.get('name')} {custom.get('version')} "
                f"({custom.get('profile') or 'any'}) is already published",
                hint="publish a new version; published releases are immutable",
            )
        md.signed.targets[path] = item.info
        store.add_file(item.info, item.source)
    succinct = _succinct(top)
    for holder, md in touched.items():
        store.stage(holder, md, [signer])
    limit = store.settings.max_per_bin * (1 if succinct is None else 2)
    if any(len(md.signed.targets) > limit for md in touched.values()):
        rebin(store, name, signer)
    return sorted(paths_seen)


def rebin(store: Store, name: str, signer: Signer) -> int:
    """Spread a model's targets over 2**bits succinct hash bins; return ``bits``."""
    role = model_role(name)
    everything = dict(iter_model_targets(store, name))
    bits = max(1, math.ceil(math.log2(max(2, 2 * len(everything) / store.settings.max_per_bin))))
    bits = min(bits, 16)
    keys = {signer.public_key.keyid: signer.public_key}
    succinct = SuccinctRoles([signer.public_key.keyid], 1, bits, bin_prefix(name))
    new_top = Metadata(Targets(expires=store.now))
    new_top.signed.delegations = Delegations(keys=keys, succinct_roles=succinct)
    bins: dict[str, Metadata[Targets]] = {
        b: Metadata(Targets(expires=store.now)) for b in succinct.get_roles()
    }
    for path, info in everything.items():
        bins[succinct.get_role_for_target(path)].signed.targets[path] = info
    # Bins of the old layout that the new one does not reuse (names change width at 5, 9
    # and 13 bits) stay listed in the snapshot as they are: TUF devices refuse a snapshot
    # that drops a role the previous one listed. No delegation reaches them any more.
    store.stage(role, new_top, [signer])
    for b, md in bins.items():
        store.stage(b, md, [signer])
        store.set_parent(b, role)
    return bits


def iter_model_targets(store: Store, name: str) -> Iterator[tuple[str, TargetFile]]:
    """Every bundle target of a model, across its bins."""
    role = model_role(name)
    top = store.role(role)
    yield from targets_of(top).items()
    succinct = _succinct(top)
    if succinct is not None:
        for b in succinct.get_roles():
            if store.has_role(b):
                yield from targets_of(store.role(b, parent=role)).items()


def model_names(store: Store) -> list[str]:
    """Names of every model delegated in top-level targets."""
    delegations = store.role(TARGETS).signed.delegations
    if delegations is None or delegations.roles is None:
        return []
    return sorted(r[len("model-") :] for r in delegations.roles if r.startswith("model-"))


def releases(store: Store, name: str) -> dict[str, dict[str, dict[str, Any]]]:
    """version → variant key → {target, architecture} for one model."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for path, info in iter_model_targets(store, name):
        custom = info.custom if isinstance(info.custom, dict) else {}
        version = str(custom.get("version", "?"))
        profile = custom.get("profile") or "any"
        archs = list(custom.get("architectures") or [])
        arch = archs[0] if len(archs) == 1 else "any"
        out.setdefault(version, {})[str(profile)] = {"target": path, "architecture": arch}
    return out


def bin_count(store: Store, name: str) -> int:
    """How many hash bins the model's role uses (0 while flat)."""
    succinct = _succinct(store.role(model_role(name)))
    return 0 if succinct is None else succinct.number_of_bins


def bin_names(store: Store, name: str) -> list[str]:
    """The hash bins of a model that exist in the repository."""
    succinct = _succinct(store.role(model_role(name)))
    if succinct is None:
        return []
    return [b for b in succinct.get_roles() if store.has_role(b)]


def _holder_for(store: Store, role: str, top: Metadata[Targets], path: str) -> str:
    if not path.startswith(f"models/{role[len('model-') :]}/"):
        raise InvalidInputError(f"{path} is outside the paths of role {role!r}")
    succinct = _succinct(top)
    if succinct is None:
        return role
    holder = succinct.get_role_for_target(path)
    store.set_parent(holder, role)
    return holder


def _succinct(md: Metadata[Targets]) -> SuccinctRoles | None:
    delegations = md.signed.delegations
    return None if delegations is None else delegations.succinct_roles


def _copy(md: Metadata[Targets]) -> Metadata[Targets]:
    return deepcopy(md)
