"""Channel documents as TUF targets of the operators' role.

The operators' role is trusted for ``channels/*/*`` only: it decides which
release each channel runs but cannot sign a bundle, and a team key cannot
sign a channel document. The document transitions themselves (promote,
rollback, revoke) are the pure functions of :mod:`edgepack.channel`.
"""

from __future__ import annotations

from copy import deepcopy

from edgepack import channel as ch
from edgepack.errors import InvalidInputError
from edgepack.repo._models import model_names, releases
from edgepack.repo._settings import OPERATORS
from edgepack.repo._store import Store, targets_of
from edgepack.repo._tuf import Metadata, Signer, TargetFile, Targets

OPERATOR_PATHS = ["channels/*/*"]


def load_document(store: Store, model: str, channel: str) -> ch.ChannelDocument:
    """The served channel document, or an empty one (sequence 0) when none exists."""
    path = ch.channel_target_path(model, channel)
    info = targets_of(store.role(OPERATORS)).get(path)
    if info is None:
        return ch.new_document(model, channel)
    doc = ch.parse_channel(store.read_target(info))
    if doc.model != model or doc.channel != channel:
        raise InvalidInputError(f"channel document {path} names another model or channel")
    return doc


def documents(store: Store) -> list[ch.ChannelDocument]:
    """Every channel document the operators' role lists, by path."""
    out = []
    for path, info in sorted(targets_of(store.role(OPERATORS)).items()):
        if path.startswith("channels/"):
            out.append(ch.parse_channel(store.read_target(info)))
    return out


def release_for(
    store: Store, model: str, version: str, rollout: float, cohorts: tuple[str, ...]
) -> ch.Release:
    """The published release ``model`` ``version`` as a channel names it."""
    if model not in model_names(store):
        raise InvalidInputError(
            f"unknown model {model!r}",
            hint=f"add it first: edgepack repo add-model WORKDIR {model} --key TEAM.pub",
        )
    variants = releases(store, model).get(version) if store.has_role(f"model-{model}") else None
    if not variants:
        raise InvalidInputError(
            f"{model} {version} is not published",
            hint="publish it first: edgepack publish BUNDLE --repo WORKDIR --key TEAM.key",
        )
    if not 0 <= rollout <= 100:
        raise InvalidInputError(f"rollout must be from 0 to 100, not {rollout}")
    return ch.Release(
        ch.check_version(version),
        float(rollout),
        cohorts,
        {k: ch.Variant(v["target"], v["architecture"]) for k, v in variants.items()},
    )


def stage_documents(store: Store, docs: list[ch.ChannelDocument], signers: list[Signer]) -> None:
    """Add the documents as operators' targets and stage a new operators version."""
    md: Metadata[Targets] = deepcopy(store.role(OPERATORS))
    for doc in docs:
        data = doc.to_bytes()
        info = TargetFile.from_data(doc.target_path, data)
        md.signed.targets[doc.target_path] = info
        store.add_file(info, data)
    store.stage(OPERATORS, md, signers)


def revoked_anywhere(store: Store, model: str, version: str) -> bool:
    """Whether any channel of ``model`` lists ``version`` as revoked."""
    return any(version in load_document(store, model, c).revoked for c in ch.CHANNELS)


def promote(
    store: Store,
    model: str,
    version: str,
    channel: str,
    *,
    rollout: float = 100.0,
    cohorts: tuple[str, ...] = (),
) -> ch.ChannelDocument:
    """The next document of ``channel`` with ``version`` current (not yet staged)."""
    ch.check_channel_name(channel)
    release = release_for(store, model, version, rollout, cohorts)
    if revoked_anywhere(store, model, version):
        raise InvalidInputError(
            f"{model} {version} is revoked", hint="promote a release that is not revoked"
        )
    return ch.promote(load_document(store, model, channel), release)


def rollback(store: Store, model: str, channel: str, to_version: str | None) -> ch.ChannelDocument:
    """The next document of ``channel`` naming an older release (a forward move)."""
    ch.check_channel_name(channel)
    return ch.rollback(load_document(store, model, channel), to_version)


def revoke(store: Store, model: str, version: str) -> list[ch.ChannelDocument]:
    """Next documents of every channel of ``model``, each listing ``version`` as revoked.

    Every channel gets it, even one that never carried the release, so no
    channel can offer it later and no device reverts to it.
    """
    if model not in model_names(store):
        raise InvalidInputError(f"unknown model {model!r}")
    known = releases(store, model) if store.has_role(f"model-{model}") else {}
    if version not in known:
        raise InvalidInputError(f"{model} {version} is not published", hint="check the version")
    out = []
    for channel in ch.CHANNELS:
        doc = load_document(store, model, channel)
        new = ch.revoke(doc, version)
        if new is not doc:
            out.append(new)
    return out
