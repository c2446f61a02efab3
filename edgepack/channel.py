"""Channel documents: which release each model channel runs, for which devices.

A channel document is one TUF target per model and channel
(``channels/NAME/CHANNEL.json``), signed through the operators' delegated
role. It names the current release (its version, rollout percentage, cohorts
and one bundle target per hardware profile), the releases that were current
before, and the revoked versions. See docs/architecture.md, "Channel
documents".

This module is pure and uses the standard library only: the device agent
imports it to decide what to install, the repository imports it to write the
documents, and both must agree byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from edgepack.errors import InvalidInputError

__all__ = [
    "ARCHITECTURES",
    "CHANNELS",
    "FORMAT",
    "FORMAT_VERSION",
    "MAX_DOCUMENT_BYTES",
    "ChannelDocument",
    "Release",
    "Selection",
    "Variant",
    "channel_target_path",
    "check_channel_name",
    "check_name",
    "check_version",
    "new_document",
    "parse_channel",
    "promote",
    "revoke",
    "rollback",
    "rollout_bucket",
    "select_release",
]

FORMAT = "edgepack-channel"
FORMAT_VERSION = 1
CHANNELS: tuple[str, ...] = ("stable", "candidate", "beta", "edge")
"""Allowed channel names, from the least to the most risky (snap's risk levels)."""
ARCHITECTURES: tuple[str, ...] = ("aarch64", "x86_64", "any")
ANY = "any"
"""Variant key of a bundle packed without a profile; also the catch-all architecture."""
MAX_DOCUMENT_BYTES = 1024 * 1024
"""A channel document larger than this is refused before parsing (endless data)."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_COHORT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# Reasons a selection returns no variant; stable strings, the agent reports them.
REASON_NO_RELEASE = "no-eligible-release"
REASON_NO_VARIANT = "no-variant"


def check_name(name: str, what: str = "model name") -> str:
    """Return ``name`` if it is a safe model or profile name, else raise."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidInputError(
            f"invalid {what} {name!r}",
            hint="use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name


def check_version(version: str) -> str:
    """Return ``version`` if it is a safe release version string, else raise."""
    if not isinstance(version, str) or not _VERSION_RE.fullmatch(version) or ".." in version:
        raise InvalidInputError(
            f"invalid version {version!r}",
            hint="use 1-64 letters, digits, '.', '_', '+' or '-', starting with a letter or digit",
        )
    return version


def check_channel_name(channel: str) -> str:
    """Return ``channel`` if it is one of :data:`CHANNELS`, else raise."""
    if channel not in CHANNELS:
        raise InvalidInputError(
            f"unknown channel {channel!r}", hint=f"use one of {', '.join(CHANNELS)}"
        )
    return channel


def channel_target_path(model: str, channel: str) -> str:
    """The TUF target path of a channel document: ``channels/NAME/CHANNEL.json``."""
    return f"channels/{check_name(model)}/{check_channel_name(channel)}.json"


@dataclass(frozen=True)
class Variant:
    """One bundle of a release: its TUF target path and the architecture it runs on."""

    target: str
    architecture: str


@dataclass(frozen=True)
class Release:
    """A release as a channel names it: version, who gets it, and its bundles by profile."""

    version: str
    rollout: float = 100.0
    cohorts: tuple[str, ...] = ()
    variants: Mapping[str, Variant] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )

    def __post_init__(self) -> None:
        # Freeze the mapping so a frozen Release is really immutable.
        if not isinstance(self.variants, MappingProxyType):
            object.__setattr__(self, "variants", MappingProxyType(dict(self.variants)))

    def admits(self, model: str, device_id: str, cohort: str | None) -> bool:
        """Whether a device falls inside this release's rollout and cohorts."""
        if self.cohorts and (cohort is None or cohort not in self.cohorts):
            return False
        if self.rollout >= 100:
            return True
        return rollout_bucket(model, self.version, device_id) < self.rollout


@dataclass(frozen=True)
class ChannelDocument:
    """The signed statement of what one model's channel runs."""

    model: str
    channel: str
    sequence: int
    current: Release | None
    previous: tuple[Release, ...] = ()
    revoked: tuple[str, ...] = ()

    @property
    def target_path(self) -> str:
        """Where this document lives in the repository's targets."""
        return channel_target_path(self.model, self.channel)

    def to_dict(self) -> dict[str, Any]:
        """The document as plain JSON data."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.model,
            "channel": self.channel,
            "sequence": self.sequence,
            "current": None if self.current is None else _release_to_dict(self.current),
            "previous": [_release_to_dict(r) for r in self.previous],
            "revoked": list(self.revoked),
        }

    def to_bytes(self) -> bytes:
        """Canonical JSON (sorted keys, compact, UTF-8, trailing newline)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return (text + "\n").encode("utf-8")

    def releases(self) -> tuple[Release, ...]:
        """The current release (if any) then the previous ones, newest first."""
        head = () if self.current is None else (self.current,)
        return head + self.previous

    def find(self, version: str) -> Release | None:
        """The release named ``version`` in this document, current or previous."""
        for release in self.releases():
            if release.version == version:
                return release
        return None


@dataclass(frozen=True)
class Selection:
    """What a device should run from one channel document, or why nothing fits.

    ``release`` is set whenever some non-revoked release admits the device;
    ``variant`` only when that release also has a bundle for the device. When
    ``variant`` is None, ``reason`` says why and the device keeps what it runs.
    """

    release: Release | None
    variant_key: str | None
    variant: Variant | None
    reason: str | None

    @property
    def ok(self) -> bool:
        """True when there is a bundle to run."""
        return self.variant is not None

    @property
    def version(self) -> str | None:
        """The selected release's version, if any."""
        return None if self.release is None else self.release.version


def rollout_bucket(model: str, version: str, device_id: str) -> float:
    """The device's bucket in ``[0, 100)`` for this release, two decimals.

    Deterministic per (model, version, device), so as a rollout percentage
    grows a device that was in stays in.
    """
    digest = hashlib.sha256(f"{model}/{version}/{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10000 / 100


def select_release(
    doc: ChannelDocument,
    *,
    device_id: str,
    profile: str | None,
    architecture: str,
    cohort: str | None = None,
) -> Selection:
    """Choose the release and bundle variant a device should run from ``doc``.

    The current release when the device is in its rollout and cohorts, else
    the newest entry of ``previous`` it is eligible for; never a revoked
    version. Then the variant for the device's profile, else the ``any``
    variant of its architecture (or of every architecture).
    """
    revoked = set(doc.revoked)
    chosen: Release | None = None
    for release in doc.releases():
        if release.version in revoked:
            continue
        if release.admits(doc.model, device_id, cohort):
            chosen = release
            break
    if chosen is None:
        return Selection(None, None, None, REASON_NO_RELEASE)
    if profile is not None:
        variant = chosen.variants.get(profile)
        if variant is not None and variant.architecture in (architecture, ANY):
            return Selection(chosen, profile, variant, None)
    fallback = chosen.variants.get(ANY)
    if fallback is not None and fallback.architecture in (architecture, ANY):
        return Selection(chosen, ANY, fallback, None)
    return Selection(chosen, None, None, REASON_NO_VARIANT)


# --- Transitions used by the repository (pure: old document in, new out) ---


def new_document(model: str, channel: str) -> ChannelDocument:
    """An empty channel before its first promotion (sequence 0, never published)."""
    return ChannelDocument(check_name(model), check_channel_name(channel), 0, None)


def promote(doc: ChannelDocument, release: Release) -> ChannelDocument:
    """Make ``release`` current; the old current moves to the front of ``previous``.

    Promoting the current version again only changes its rollout, cohorts and
    variants (a growing staged rollout), so ``previous`` stays as it was.
    """
    check_version(release.version)
    if release.version in doc.revoked:
        raise InvalidInputError(
            f"{doc.model} {release.version} is revoked",
            hint="promote a release that is not revoked",
        )
    previous = [r for r in doc.previous if r.version != release.version]
    if doc.current is not None and doc.current.version != release.version:
        previous.insert(0, doc.current)
    return replace(doc, sequence=doc.sequence + 1, current=release, previous=tuple(previous))


def rollback(doc: ChannelDocument, to_version: str | None = None) -> ChannelDocument:
    """A forward move back to an older release, for every device of the channel.

    The target is ``to_version`` or else the newest non-revoked entry of
    ``previous``; it becomes current with rollout 100 and its cohorts, and the
    rolled-back release moves into ``previous``.
    """
    if doc.current is None:
        raise InvalidInputError(
            f"channel {doc.channel} of {doc.model} has no release to roll back from",
            hint="promote a release first",
        )
    candidates = [r for r in doc.previous if r.version not in doc.revoked]
    if to_version is None:
        if not candidates:
            raise InvalidInputError(
                f"channel {doc.channel} of {doc.model} has no earlier release to roll back to",
                hint="promote the release you want instead",
            )
        target = candidates[0]
    else:
        found = [r for r in candidates if r.version == to_version]
        if not found:
            why = "is revoked" if to_version in doc.revoked else "was never on this channel"
            raise InvalidInputError(
                f"cannot roll {doc.model} {doc.channel} back to {to_version}: it {why}",
                hint="pick a version listed under previous by `edgepack repo status`",
            )
        target = found[0]
    target = replace(target, rollout=100.0)
    rest = [r for r in doc.previous if r.version != target.version]
    previous = (doc.current, *rest)
    return replace(doc, sequence=doc.sequence + 1, current=target, previous=previous)


def revoke(doc: ChannelDocument, version: str) -> ChannelDocument:
    """List ``version`` as revoked so no device installs it or reverts to it."""
    check_version(version)
    if version in doc.revoked:
        return doc
    revoked = tuple(sorted({*doc.revoked, version}))
    return replace(doc, sequence=doc.sequence + 1, revoked=revoked)


# --- Parsing ---


def parse_channel(data: bytes) -> ChannelDocument:
    """Parse and strictly validate a channel document.

    Refuses oversize input, invalid UTF-8 or JSON, duplicate keys, NaN,
    unknown or missing fields, bad names, channels outside :data:`CHANNELS`
    and bundle targets outside ``models/NAME/``, with one clear error.
    """
    if len(data) > MAX_DOCUMENT_BYTES:
        raise InvalidInputError(
            f"channel document is {len(data)} bytes, over the {MAX_DOCUMENT_BYTES}-byte limit"
        )
    try:
        raw = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # RecursionError: arrays or objects nested past the interpreter's stack.
        raise InvalidInputError(f"channel document is not valid JSON: {exc}") from None
    top = _object(raw, "channel document")
    _keys(
        top,
        {"format", "format_version", "model", "channel", "sequence", "current", "previous"},
        {"revoked"},
        "channel document",
    )
    if top["format"] != FORMAT:
        raise InvalidInputError(f"not a channel document: format is {top['format']!r}")
    if top["format_version"] != FORMAT_VERSION or isinstance(top["format_version"], bool):
        raise InvalidInputError(
            f"unsupported channel format_version {top['format_version']!r}",
            hint="upgrade edgepack",
        )
    model = check_name(_string(top["model"], "model"))
    channel = check_channel_name(_string(top["channel"], "channel"))
    sequence = top["sequence"]
    if not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 1:
        raise InvalidInputError(f"channel sequence must be a positive integer, not {sequence!r}")
    current = None if top["current"] is None else _release(top["current"], model, "current")
    previous_raw = top["previous"]
    if not isinstance(previous_raw, list):
        raise InvalidInputError("channel field 'previous' must be a list")
    previous = tuple(_release(item, model, f"previous[{i}]") for i, item in enumerate(previous_raw))
    versions = [r.version for r in (() if current is None else (current,)) + previous]
    if len(set(versions)) != len(versions):
        raise InvalidInputError("channel document names the same version twice")
    revoked = tuple(check_version(v) for v in _string_list(top.get("revoked", []), "revoked"))
    return ChannelDocument(model, channel, sequence, current, previous, revoked)


def _release(raw: object, model: str, where: str) -> Release:
    obj = _object(raw, where)
    _keys(obj, {"version", "rollout", "cohorts", "variants"}, set(), where)
    version = check_version(_string(obj["version"], f"{where}.version"))
    rollout = obj["rollout"]
    if (
        not isinstance(rollout, (int, float))
        or isinstance(rollout, bool)
        or not math.isfinite(rollout)
        or not 0 <= rollout <= 100
    ):
        raise InvalidInputError(f"{where}.rollout must be a number from 0 to 100, not {rollout!r}")
    cohorts = _string_list(obj["cohorts"], f"{where}.cohorts")
    for cohort in cohorts:
        if not _COHORT_RE.fullmatch(cohort):
            raise InvalidInputError(f"invalid cohort name {cohort!r} in {where}")
    variants_raw = _object(obj["variants"], f"{where}.variants")
    variants: dict[str, Variant] = {}
    prefix = f"models/{model}/"
    for key, value in variants_raw.items():
        check_name(key, f"profile name in {where}.variants")
        vobj = _object(value, f"{where}.variants.{key}")
        _keys(vobj, {"target", "architecture"}, set(), f"{where}.variants.{key}")
        target = _string(vobj["target"], f"{where}.variants.{key}.target")
        rest = target[len(prefix) :]
        if not target.startswith(prefix) or not rest or "/" in rest or rest.startswith("."):
            raise InvalidInputError(
                f"{where}.variants.{key}.target {target!r} is not a bundle under {prefix}"
            )
        arch = _string(vobj["architecture"], f"{where}.variants.{key}.architecture")
        if arch not in ARCHITECTURES:
            raise InvalidInputError(
                f"{where}.variants.{key}.architecture {arch!r} is not one of "
                f"{', '.join(ARCHITECTURES)}"
            )
        variants[key] = Variant(target, arch)
    return Release(version, float(rollout), cohorts, variants)


def _release_to_dict(release: Release) -> dict[str, Any]:
    rollout: float | int = release.rollout
    if float(rollout).is_integer():
        rollout = int(rollout)
    return {
        "version": release.version,
        "rollout": rollout,
        "cohorts": list(release.cohorts),
        "variants": {
            key: {"target": v.target, "architecture": v.architecture}
            for key, v in sorted(release.variants.items())
        },
    }


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _object(raw: object, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise InvalidInputError(f"{where} must be a JSON object")
    return raw


def _keys(obj: Mapping[str, Any], required: set[str], optional: set[str], where: str) -> None:
    missing = required - obj.keys()
    if missing:
        raise InvalidInputError(f"{where} lacks {', '.join(sorted(missing))}")
    unknown = obj.keys() - required - optional
    if unknown:
        raise InvalidInputError(f"{where} has unknown field(s) {', '.join(sorted(unknown))}")


def _string(raw: object, where: str) -> str:
    if not isinstance(raw, str):
        raise InvalidInputError(f"{where} must be a string")
    return raw


def _string_list(raw: object, where: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise InvalidInputError(f"{where} must be a list of strings")
    items: Iterable[str] = raw
    out = tuple(items)
    if len(set(out)) != len(out):
        raise InvalidInputError(f"{where} lists the same entry twice")
    return out
