"""``edgepack repo log``: the audit trail, rebuilt from the signed metadata history.

The repository keeps every version of every role as ``public/metadata/N.ROLE.json``
(consistent snapshots) and every target under its hash-prefixed name, so the
history is already there, signed. This module reads it all, checks each
version's signatures, and diffs consecutive states:

* root versions: key rotations (which role's key ids changed);
* top-level targets: a model team added, a delegated role's keys changed;
* a model team's role and its hash bins, taken together: bundles published or
  withdrawn (so a re-bin that only moves targets is no event);
* the operators' channel documents: promote, rollout change, rollback, revoke;
* the envelopes role's ``keys/revoked.json``: devices revoked.

Order: snapshot versions give the order of commits (each one names the role
versions it made current), so role states are compared snapshot by snapshot.

Signature checks: root version 1 by itself, root N by root N-1 and by itself
(TUF's chain). Any other role version must verify against a verified version of
its delegating role (root for top-level roles, targets for delegated roles, the
team role for its bins): for a delegated role, a delegator version some verified
snapshot served it with (so a key removed by a rotation cannot sign a later
version); for a top-level role, a root version signed at or before it. An edit
breaks that; a version that fails is an ``unverified`` entry, never skipped, and
its content is not used: the next verified version is compared with the last
verified one.

Time: TUF metadata carries no signing time, and channel documents have no
timestamp field either, so an entry's time is the version's ``expires`` minus
the expiry period ``repo.toml`` sets for that role (what every operation adds
to its ``now``). A device revocation uses the time recorded in
``keys/revoked.json`` itself. Changing an expiry period in ``repo.toml`` later
shifts the derived times of older versions; the order stays right.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from tuf.api.exceptions import LengthOrHashMismatchError, UnsignedMetadataError
from tuf.api.serialization import DeserializationError

from edgepack import channel as ch
from edgepack import envelope as env
from edgepack.errors import EdgepackError, InvalidInputError
from edgepack.repo._settings import (
    OPERATORS,
    ROOT,
    SNAPSHOT,
    TARGETS,
    TIMESTAMP,
    RepoPaths,
    Settings,
)
from edgepack.repo._tuf import Metadata, Root, Snapshot, TargetFile, Targets

ENVELOPES = "envelopes"
MAX_METADATA_BYTES = 64 * 1024 * 1024
"""A metadata or target file larger than this is reported, not read (endless data)."""

_NAME_RE = re.compile(r"^([0-9]+)\.(.+)\.json$")
_TOP_KINDS = (ROOT, TARGETS, SNAPSHOT, TIMESTAMP, OPERATORS)


@dataclass(frozen=True)
class LogEntry:
    """One event of the audit trail.

    ``role``/``role_version`` name the metadata version that records it and
    ``keyids`` the keys whose valid signatures it carries.
    """

    time: str
    action: str
    role: str
    role_version: int
    keyids: list[str]
    model: str | None = None
    channel: str | None = None
    versions: list[str] = field(default_factory=list)
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The entry as plain JSON data."""
        return asdict(self)


@dataclass
class _Version:
    md: Metadata[Any]
    time: datetime
    keyids: list[str]
    verified: bool = False


def _iso(when: datetime) -> str:
    return when.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _delegator(role: str) -> str:
    if role in (TARGETS, SNAPSHOT, TIMESTAMP):
        return ROOT
    if "~bin-" in role:
        return role.split("~bin-", 1)[0]
    return TARGETS


class _History:
    """Every metadata version of the repository, parsed and signature-checked."""

    def __init__(self, paths: RepoPaths, settings: Settings) -> None:
        self.paths = paths
        self.settings = settings
        self.roles: dict[str, dict[int, _Version]] = {}
        self.problems: list[LogEntry] = []
        self.in_force: dict[tuple[str, int], set[int]] = {}

    def load(self) -> None:
        for path in sorted(self.paths.metadata.glob("*.json")):
            match = _NAME_RE.fullmatch(path.name)
            if match is None:
                continue  # timestamp.json: not versioned, re-signed by refresh only
            number, role = int(match.group(1)), match.group(2)
            try:
                if path.stat().st_size > MAX_METADATA_BYTES:
                    raise ValueError("file too large")
                md: Metadata[Any] = Metadata.from_bytes(path.read_bytes())
                if md.signed.version != number:
                    raise ValueError(f"it holds version {md.signed.version}")
            except (OSError, ValueError, DeserializationError) as exc:
                self._problem(role, number, f"{path.name} cannot be read: {exc}")
                continue
            kind = role if role in _TOP_KINDS else "models"
            when = md.signed.expires - timedelta(days=self.settings.expiry_for(kind))
            self.roles.setdefault(role, {})[number] = _Version(md, when, [])
        self._verify_roots()
        order = sorted(
            (r for r in self.roles if r != ROOT),
            key=lambda r: (0 if _delegator(r) == ROOT else 1 + r.count("~"), r),
        )
        for role in order:
            if _delegator(role) != ROOT and not self.in_force:
                self._pin()
            self._verify_role(role)

    def _pin(self) -> None:
        """Which delegator versions each delegated role version was served with.

        A verified snapshot names the role versions devices got together; a
        delegated role's version must verify against the delegator version of
        a snapshot that lists it, so a key removed from the delegation cannot
        sign a later version (whatever expiry it claims).
        """
        for version in self.roles.get(SNAPSHOT, {}).values():
            if not version.verified:
                continue
            meta = version.md.signed.meta
            state = {n[: -len(".json")]: m.version for n, m in meta.items() if n.endswith(".json")}
            for role, number in state.items():
                parent = _delegator(role)
                if parent != ROOT and parent in state:
                    self.in_force.setdefault((role, number), set()).add(state[parent])
        self.in_force.setdefault(("", 0), set())  # pinned once, even with no snapshot

    def _problem(self, role: str, version: int, detail: str, when: str = "") -> None:
        self.problems.append(LogEntry(when, "unverified", role, version, [], detail=detail))

    def _check(self, delegator: Root | Targets, role: str, version: _Version) -> list[str]:
        """Key ids of the valid signatures, or raise if below the threshold."""
        md = version.md
        delegator.verify_delegate(role, md.signed_bytes, md.signatures)
        keyids = delegator.get_delegated_role(role).keyids
        return sorted(k for k in md.signatures if k in keyids)

    def _verify_roots(self) -> None:
        roots = self.roles.get(ROOT, {})
        previous: _Version | None = None
        for number in sorted(roots):
            version = roots[number]
            try:
                if previous is None and number != 1:
                    raise ValueError(f"root version {number - 1} is missing")
                signers = [version] if previous is None else [previous, version]
                ids: set[str] = set()
                for signer in signers:
                    ids.update(self._check(signer.md.signed, ROOT, version))
                version.keyids = sorted(ids)
                version.verified = True
                previous = version
            except (UnsignedMetadataError, ValueError) as exc:
                self._problem(ROOT, number, f"signature check failed: {exc}", _iso(version.time))
                break  # the chain is broken: later roots cannot be trusted
        reported = {p.role_version for p in self.problems if p.role == ROOT}
        for number in sorted(roots):
            if not roots[number].verified and number not in reported:
                self._problem(ROOT, number, "not reachable through a verified root chain")

    def _verify_role(self, role: str) -> None:
        parent = self.roles.get(_delegator(role), {})
        trusted = sorted(
            (v for v in parent.values() if v.verified),
            key=lambda v: int(v.md.signed.version),
            reverse=True,
        )
        for number, version in sorted(self.roles[role].items()):
            pinned = self.in_force.get((role, number))
            if pinned is not None:
                # the delegator versions served with it (see _pin)
                candidates = [v for v in trusted if int(v.md.signed.version) in pinned]
            else:
                # the delegator versions in force when it was signed (newest first)
                candidates = [v for v in trusted if v.time <= version.time] or trusted[-1:]
            error = "its delegating role has no verified version"
            for candidate in candidates:
                try:
                    version.keyids = self._check(candidate.md.signed, role, version)
                    version.verified = True
                    break
                except (UnsignedMetadataError, ValueError) as exc:
                    error = str(exc)
            if not version.verified:
                self._problem(role, number, f"signature check failed: {error}", _iso(version.time))

    def get(self, role: str, number: int | None) -> _Version | None:
        if number is None:
            return None
        version = self.roles.get(role, {}).get(number)
        return version if version is not None and version.verified else None

    def read_target(self, info: TargetFile) -> bytes | None:
        """A target's bytes (hash-prefixed name), or None when missing or altered."""
        path = self.paths.targets / info.get_prefixed_paths()[0]
        try:
            if path.stat().st_size > MAX_METADATA_BYTES:
                return None
            data = path.read_bytes()
            info.verify_length_and_hashes(data)
        except (OSError, ValueError, LengthOrHashMismatchError):
            return None
        return data


_ModelTargets = dict[str, tuple[TargetFile, str, "_Version"]]
"""A model's bundle targets: path -> (target, the role listing it, that role's version)."""


def _model_targets(
    history: _History, state: dict[str, int], model_role: str
) -> _ModelTargets | None:
    """Every bundle target of a model (its role and bins): path → (info, role, version)."""
    out: _ModelTargets = {}
    for role, number in state.items():
        if role != model_role and not role.startswith(model_role + "~bin-"):
            continue
        version = history.get(role, number)
        if version is None:
            return None
        for path, info in version.md.signed.targets.items():
            out[path] = (info, role, version)
    return out


def _release_text(release: ch.Release | None) -> str:
    if release is None:
        return "none"
    cohorts = f", cohorts {','.join(release.cohorts)}" if release.cohorts else ""
    return f"{release.version} at {release.rollout:g}%{cohorts}"


def _channel_events(
    old: ch.ChannelDocument | None, new: ch.ChannelDocument
) -> list[tuple[str, list[str], str]]:
    """(action, versions, detail) for each change from ``old`` to ``new``."""
    events: list[tuple[str, list[str], str]] = []
    before = old.current if old is not None else None
    after = new.current
    old_revoked = set(old.revoked) if old is not None else set()
    for version in sorted(set(new.revoked) - old_revoked):
        events.append(("revoke", [version], f"{version} revoked"))
    if after is not None and after != before:
        if before is not None and after.version == before.version:
            events.append(
                ("rollout", [after.version], f"{_release_text(before)} -> {_release_text(after)}")
            )
        elif (
            before is not None
            and old is not None
            and any(r.version == after.version for r in old.previous)
        ):
            events.append(
                (
                    "rollback",
                    [before.version, after.version],
                    f"{before.version} -> {after.version}",
                )
            )
        else:
            versions = ([before.version] if before else []) + [after.version]
            events.append(
                ("promote", versions, f"{_release_text(before)} -> {_release_text(after)}")
            )
    return events


class _Builder:
    """Turns the verified history into entries, one snapshot step at a time."""

    def __init__(self, history: _History) -> None:
        self.h = history
        self.entries: list[tuple[datetime, int, LogEntry]] = []
        self.channel_docs: dict[str, ch.ChannelDocument] = {}
        self.revoked: dict[str, env.Revocation] | None = None

    def add(self, when: datetime, order: int, entry: LogEntry) -> None:
        self.entries.append((when, order, entry))

    def entry(self, version: _Version, role: str, action: str, **kw: Any) -> LogEntry:
        return LogEntry(
            _iso(version.time), action, role, int(version.md.signed.version), version.keyids, **kw
        )

    def roots(self) -> None:
        roots = self.h.roles.get(ROOT, {})
        previous: Root | None = None
        for number in sorted(roots):
            version = roots[number]
            if not version.verified:
                break
            root: Root = version.md.signed
            if previous is None:
                self.add(
                    version.time, 0, self.entry(version, ROOT, "init", detail="repository created")
                )
            else:
                for name, role in sorted(root.roles.items()):
                    old = set(previous.roles[name].keyids) if name in previous.roles else set()
                    if set(role.keyids) != old:
                        detail = (
                            f"{name} keys {','.join(sorted(old)) or '-'} -> "
                            f"{','.join(sorted(role.keyids))}"
                        )
                        self.add(
                            version.time,
                            number,
                            self.entry(version, ROOT, "key-rotation", detail=detail),
                        )
            previous = root

    def targets_step(self, old: _Version | None, new: _Version, order: int) -> None:
        old_roles = (
            dict(old.md.signed.delegations.roles or {})
            if old is not None and old.md.signed.delegations
            else {}
        )
        delegations = new.md.signed.delegations
        for name, role in sorted((delegations.roles or {}).items() if delegations else []):
            model = name[len("model-") :] if name.startswith("model-") else None
            if name not in old_roles:
                action = "add-model" if model else "delegate"
                detail = f"{name} delegated to {','.join(role.keyids)}"
                self.add(
                    new.time, order, self.entry(new, TARGETS, action, model=model, detail=detail)
                )
            elif set(old_roles[name].keyids) != set(role.keyids):
                detail = (
                    f"{name} keys {','.join(sorted(old_roles[name].keyids))} -> "
                    f"{','.join(sorted(role.keyids))}"
                )
                self.add(
                    new.time,
                    order,
                    self.entry(new, TARGETS, "key-rotation", model=model, detail=detail),
                )

    def model_step(
        self, name: str, old: _ModelTargets, new: _ModelTargets, state: dict[str, int], order: int
    ) -> None:
        """Publish and withdraw entries of one model between two snapshots."""
        top = f"model-{name}"
        for path in sorted(set(new) - set(old)):
            info, role, version = new[path]
            custom = info.unrecognized_fields.get("custom")
            custom = custom if isinstance(custom, dict) else {}
            release = str(custom.get("version", "?"))
            profile = custom.get("profile") or "any"
            self.add(
                version.time,
                order,
                self.entry(
                    version,
                    role,
                    "publish",
                    model=name,
                    versions=[release],
                    detail=f"{path} (profile {profile})",
                ),
            )
        for path in sorted(set(old) - set(new)):
            info, role, _version = old[path]
            custom = info.unrecognized_fields.get("custom")
            release = str(custom.get("version", "?")) if isinstance(custom, dict) else "?"
            signer = self.h.get(role, state.get(role)) or self.h.get(top, state.get(top))
            if signer is None:
                continue
            self.add(
                signer.time,
                order,
                self.entry(signer, role, "withdraw", model=name, versions=[release], detail=path),
            )

    def operators_step(self, new: _Version, order: int) -> None:
        for path, info in sorted(new.md.signed.targets.items()):
            if not path.startswith("channels/"):
                continue
            old = self.channel_docs.get(path)
            data = self.h.read_target(info)
            if data is None:
                self.h._problem(
                    OPERATORS,
                    int(new.md.signed.version),
                    f"channel document {path} is missing or does not match its signed hashes",
                    _iso(new.time),
                )
                continue
            try:
                doc = ch.parse_channel(data)
            except EdgepackError as exc:
                self.h._problem(
                    OPERATORS, int(new.md.signed.version), f"{path}: {exc}", _iso(new.time)
                )
                continue
            if old is None or doc.sequence != old.sequence:
                for action, versions, detail in _channel_events(old, doc):
                    self.add(
                        new.time,
                        order,
                        self.entry(
                            new,
                            OPERATORS,
                            action,
                            model=doc.model,
                            channel=doc.channel,
                            versions=versions,
                            detail=detail,
                        ),
                    )
            self.channel_docs[path] = doc

    def envelopes_step(self, new: _Version, order: int) -> None:
        info = new.md.signed.targets.get(env.REVOKED_PATH)
        if info is None:
            return
        data = self.h.read_target(info)
        if data is None:
            self.h._problem(
                ENVELOPES,
                int(new.md.signed.version),
                f"{env.REVOKED_PATH} is missing or does not match its signed hashes",
                _iso(new.time),
            )
            return
        try:
            revoked = env.parse_revoked(data)
        except EdgepackError as exc:
            self.h._problem(ENVELOPES, int(new.md.signed.version), str(exc), _iso(new.time))
            return
        before = self.revoked or {}
        for device in sorted(set(revoked) - set(before)):
            record = revoked[device]
            try:
                when = datetime.fromisoformat(record.time.replace("Z", "+00:00"))
            except ValueError:
                when = new.time
            reason = f": {record.reason}" if record.reason else ""
            entry = self.entry(new, ENVELOPES, "revoke-device", detail=f"device {device}{reason}")
            self.add(when, order, LogEntry(**{**entry.to_dict(), "time": _iso(when)}))
        self.revoked = revoked

    def snapshots(self) -> None:
        snapshots = self.h.roles.get(SNAPSHOT, {})
        previous: dict[str, int] = {}
        models_before: dict[str, _ModelTargets] = {}
        for number in sorted(snapshots):
            snap = self.h.get(SNAPSHOT, number)
            if snap is None:
                continue
            signed: Snapshot = snap.md.signed
            state = {
                name[: -len(".json")]: meta.version
                for name, meta in signed.meta.items()
                if name.endswith(".json")
            }
            changed = {r for r, v in state.items() if previous.get(r) != v}
            if TARGETS in changed and (new := self.h.get(TARGETS, state[TARGETS])):
                self.targets_step(self.h.get(TARGETS, previous.get(TARGETS)), new, number)
            model_roles = {r.split("~bin-", 1)[0] for r in changed if r.startswith("model-")}
            model_roles |= {
                r.split("~bin-", 1)[0]
                for r in previous
                if r.startswith("model-") and r not in state
            }
            for role in sorted(model_roles):
                targets = _model_targets(self.h, state, role)
                if targets is None:
                    continue  # an unverified version: reported, its content not trusted
                self.model_step(
                    role[len("model-") :], models_before.get(role, {}), targets, state, number
                )
                models_before[role] = targets
            if OPERATORS in changed and (new := self.h.get(OPERATORS, state[OPERATORS])):
                self.operators_step(new, number)
            if ENVELOPES in changed and (new := self.h.get(ENVELOPES, state[ENVELOPES])):
                self.envelopes_step(new, number)
            previous = state


def audit_log(workdir: Path, model: str | None = None) -> tuple[list[LogEntry], bool]:
    """The repository's audit trail and whether every metadata version verified.

    Entries are sorted by time, then by commit order; ``model`` keeps only the
    entries of that model (``unverified`` entries are always kept).
    """
    paths = RepoPaths(workdir)
    settings = Settings.load(paths)
    if not paths.metadata.is_dir() or not any(paths.metadata.glob("*.root.json")):
        raise InvalidInputError(
            f"{workdir} has no repository metadata (no public/metadata/N.root.json)",
            hint="create the repository with: edgepack repo init WORKDIR",
        )
    history = _History(paths, settings)
    history.load()
    builder = _Builder(history)
    builder.roots()
    builder.snapshots()
    entries = [e for _, _, e in sorted(builder.entries, key=lambda t: (t[0], t[1]))]
    if model is not None:
        entries = [e for e in entries if e.model == model]
    problems = sorted(history.problems, key=lambda e: (e.role, e.role_version))
    return entries + problems, not problems
