"""Reading the served tree's current metadata and committing changes atomically.

A :class:`Store` is one transaction. It loads the metadata the repository
currently serves (following ``timestamp.json`` → snapshot → roles, so what it
edits is what devices see), verifies each file's signatures as it loads it,
and collects staged changes. :meth:`Store.commit` then writes, in order:
target files, new role versions, the snapshot, root (if it changed) and
``timestamp.json`` last, each through a temporary file, fsync and
``os.replace``. Versioned files never overwrite a file a reader may be using,
so a reader polling during a publish sees the old state or the new one,
never a mix. Every check and every key is resolved before the first write,
so a failure leaves the tree unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from copy import deepcopy
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from edgepack._atomic import fsync_dir
from edgepack._atomic import write_atomic as _write_atomic
from edgepack.errors import ConflictError, InvalidInputError, KeyFileError
from edgepack.repo._keys import PassphraseSource, open_signer
from edgepack.repo._settings import (
    OPERATORS,
    ROOT,
    SNAPSHOT,
    TARGETS,
    TIMESTAMP,
    RepoPaths,
    Settings,
)
from edgepack.repo._tuf import (
    Metadata,
    MetaFile,
    Root,
    Signer,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

T = TypeVar("T", Root, Timestamp, Snapshot, Targets)
SERIALIZER = JSONSerializer(compact=True)
LOCK_WAIT_SECONDS = 5.0


def utcnow() -> datetime:
    """The current time, UTC, whole seconds (TUF expiry has second precision)."""
    return datetime.now(timezone.utc).replace(microsecond=0)


@contextlib.contextmanager
def publish_lock(paths: RepoPaths, wait: float = LOCK_WAIT_SECONDS) -> Iterator[None]:
    """Hold the repository's exclusive publish lock, or raise :class:`ConflictError`.

    Non-blocking ``flock`` retried for ``wait`` seconds: a concurrent publisher
    gets a clear "retry" instead of hanging behind a stuck one.
    """
    paths.workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise ConflictError(
                        "another publish is in progress; retry",
                        hint=f"the lock {paths.lock} is held by another edgepack process",
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file, fsync and ``os.replace`` (mode 0644)."""
    _write_atomic(path, data, mode=0o644)


def copy_atomic(source: Path, path: Path) -> None:
    """Copy a (possibly large) file in one pass, atomically, as :func:`write_atomic`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as handle, open(source, "rb") as src:
            shutil.copyfileobj(src, handle, 1024 * 1024)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@dataclass
class _Staged:
    md: Metadata[Targets]
    signers: list[Signer]


@dataclass
class CommitResult:
    """What a commit wrote: role → new version."""

    versions: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


class Store:
    """One transaction over the repository's metadata (see the module docstring)."""

    def __init__(
        self,
        paths: RepoPaths,
        settings: Settings,
        *,
        now: datetime,
        passphrase: PassphraseSource,
        fresh: bool = False,
    ) -> None:
        self.paths = paths
        self.settings = settings
        self.now = now
        self.passphrase = passphrase
        self._fresh = fresh
        self._root: Metadata[Root] | None = None
        self._timestamp: Metadata[Timestamp] | None = None
        self._snapshot: Metadata[Snapshot] | None = None
        self._roles: dict[str, Metadata[Targets]] = {}
        self._parents: dict[str, str] = {}
        self._staged: dict[str, _Staged] = {}
        self._dropped: set[str] = set()
        self._files: list[tuple[TargetFile, Path | bytes]] = []
        self._new_root: tuple[Metadata[Root], list[Signer]] | None = None
        self._signers: dict[str, list[Signer]] = {}

    # --- reading ---

    def root(self) -> Metadata[Root]:
        """The newest root the tree serves (the highest ``N.root.json``)."""
        if self._new_root is not None:
            return self._new_root[0]
        if self._root is None:
            versions = [
                int(p.name.split(".", 1)[0])
                for p in self.paths.metadata.glob("*.root.json")
                if p.name.split(".", 1)[0].isdigit()
            ]
            if not versions:
                raise InvalidInputError(
                    f"{self.paths.workdir} has no root metadata",
                    hint="create the repository with: edgepack repo init WORKDIR",
                )
            top = max(versions)
            self._root = self._load(f"{top}.root.json", Root)
            self._check(ROOT, self._root, self._root.signed)
        return self._root

    def timestamp(self) -> Metadata[Timestamp]:
        """The served ``timestamp.json``."""
        if self._timestamp is None:
            if self._fresh:
                self._timestamp = Metadata(Timestamp(version=1, expires=self.now))
            else:
                self._timestamp = self._load("timestamp.json", Timestamp)
                self._check(TIMESTAMP, self._timestamp, self.root().signed)
        return self._timestamp

    def snapshot(self) -> Metadata[Snapshot]:
        """The snapshot the served timestamp names."""
        if self._snapshot is None:
            if self._fresh:
                self._snapshot = Metadata(Snapshot(version=1, expires=self.now, meta={}))
            else:
                version = self.timestamp().signed.snapshot_meta.version
                self._snapshot = self._load(f"{version}.snapshot.json", Snapshot)
                self._check(SNAPSHOT, self._snapshot, self.root().signed)
        return self._snapshot

    def has_role(self, role: str) -> bool:
        """Whether ``role`` exists (served or staged)."""
        if role in self._staged:
            return True
        return role not in self._dropped and f"{role}.json" in self.snapshot().signed.meta

    def role(self, role: str, parent: str = TARGETS) -> Metadata[Targets]:
        """The current metadata of a targets role (staged changes included).

        ``parent`` is the delegating role whose keys must have signed it.
        """
        if role in self._staged:
            return self._staged[role].md
        if role not in self._roles:
            meta = self.snapshot().signed.meta.get(f"{role}.json")
            if meta is None or role in self._dropped:
                raise InvalidInputError(f"the repository has no role {role!r}")
            md = self._load(f"{meta.version}.{role}.json", Targets)
            delegator: Root | Targets = (
                self.root().signed if role == TARGETS else self.role(parent).signed
            )
            self._check(role, md, delegator)
            self._roles[role] = md
            self._parents[role] = parent
        return self._roles[role]

    def read_target(self, info: TargetFile) -> bytes:
        """The bytes of a served target file, checked against its TUF length and hashes."""
        path = self.paths.targets / info.get_prefixed_paths()[0]
        try:
            data = path.read_bytes()
            info.verify_length_and_hashes(data)
        except (OSError, ValueError) as exc:
            raise InvalidInputError(
                f"target {info.path} in the working tree is missing or corrupted: {exc}",
                hint="restore public/targets from a backup",
            ) from None
        return data

    def _load(self, name: str, kind: type[T]) -> Metadata[T]:
        path = self.paths.metadata / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise InvalidInputError(
                f"metadata file {path} is missing",
                hint="restore public/metadata from a backup",
            ) from None
        try:
            md: Metadata[T] = Metadata.from_bytes(data)
        except DeserializationError as exc:
            raise InvalidInputError(
                f"metadata file {path} is corrupted ({exc})",
                hint="restore it from a backup; nothing was changed",
            ) from None
        if not isinstance(md.signed, kind):
            raise InvalidInputError(f"metadata file {path} is not {kind.type} metadata")
        return md

    def _check(self, role: str, md: Metadata[Any], delegator: Root | Targets) -> None:
        try:
            delegator.verify_delegate(role, md.signed_bytes, md.signatures)
        except (UnsignedMetadataError, ValueError) as exc:
            raise InvalidInputError(
                f"metadata of role {role!r} in the working tree fails its signature check ({exc})",
                hint="the file was altered; restore public/metadata from a backup",
            ) from None

    # --- keys ---

    def signers(self, role: str, specs: list[str] | None = None) -> list[Signer]:
        """Open the keys of ``role`` (from repo.toml unless ``specs`` is given).

        Every key must be one the role's delegator trusts, and together they
        must reach the role's threshold.
        """
        if specs is None and role in self._signers:
            return self._signers[role]
        if specs is None:
            specs = self.settings.keys.get(role, [])
        if not specs:
            raise KeyFileError(
                f"no key configured for role {role!r}",
                hint="pass --key, or list it under [keys] in repo.toml",
            )
        delegator: Root | Targets
        if role in (ROOT, TARGETS, SNAPSHOT, TIMESTAMP):
            delegator = self.root().signed
        else:
            delegator = self.role(self._parents.get(role, TARGETS)).signed
        trusted_role = delegator.get_delegated_role(role)
        trusted = [delegator.get_key(k) for k in trusted_role.keyids]
        out = [
            open_signer(
                s, base=self.paths.workdir, passphrase=self.passphrase, trusted=trusted, role=role
            )
            for s in specs
        ]
        if len({s.public_key.keyid for s in out}) < trusted_role.threshold:
            raise KeyFileError(
                f"role {role!r} needs {trusted_role.threshold} keys and only {len(out)} were given"
            )
        self._signers[role] = out
        return out

    def use_signers(self, role: str, signers: list[Signer]) -> None:
        """Sign ``role`` with these (already opened) signers from now on."""
        self._signers[role] = signers

    # --- staging ---

    def stage(self, role: str, md: Metadata[Targets], signers: list[Signer]) -> None:
        """Mark ``md`` as the next version of ``role``, to be signed by ``signers``."""
        self._staged[role] = _Staged(md, signers)
        self._dropped.discard(role)

    def set_parent(self, role: str, parent: str) -> None:
        """Record that ``parent`` delegates ``role`` (for hash bins)."""
        self._parents[role] = parent

    def drop(self, role: str) -> None:
        """Remove ``role`` from the snapshot (a hash bin no longer in use)."""
        self._staged.pop(role, None)
        self._dropped.add(role)

    def add_file(self, info: TargetFile, source: Path | bytes) -> None:
        """Copy ``source`` into the served targets under its hash-prefixed name."""
        self._files.append((info, source))

    def stage_root(self, md: Metadata[Root], signers: list[Signer]) -> None:
        """Mark ``md`` as the next root version, signed by old and new root keys."""
        self._new_root = (md, signers)

    @property
    def staged_roles(self) -> list[str]:
        """Names of the roles with a staged new version."""
        return list(self._staged)

    # --- committing ---

    def commit(
        self, *, force_snapshot: bool = False, force_timestamp: bool = False
    ) -> CommitResult:
        """Write everything staged, in reader-safe order; see the module docstring."""
        result = CommitResult()
        bump_snapshot = bool(self._staged or self._dropped) or force_snapshot
        bump_timestamp = bump_snapshot or force_timestamp or self._new_root is not None
        if not (bump_timestamp or self._files):
            return result
        snapshot = deepcopy(self.snapshot())
        timestamp = deepcopy(self.timestamp())
        snap_signers = self.signers(SNAPSHOT) if bump_snapshot else []
        ts_signers = self.signers(TIMESTAMP) if bump_timestamp else []

        for info, source in self._files:
            for rel in info.get_prefixed_paths():
                dest = self.paths.targets / rel
                if isinstance(source, bytes):
                    write_atomic(dest, source)
                else:
                    copy_atomic(source, dest)
                result.files.append(rel)

        for role, staged in self._staged.items():
            old = snapshot.signed.meta.get(f"{role}.json")
            staged.md.signed.version = old.version + 1 if old else 1
            self._finish(staged.md, role, staged.signers)
            data = staged.md.to_bytes(SERIALIZER)
            write_atomic(self.paths.metadata / f"{staged.md.signed.version}.{role}.json", data)
            snapshot.signed.meta[f"{role}.json"] = MetaFile(
                version=staged.md.signed.version, length=len(data)
            )
            result.versions[role] = staged.md.signed.version
        for role in self._dropped:
            snapshot.signed.meta.pop(f"{role}.json", None)

        if bump_snapshot:
            snapshot.signed.version += 0 if self._fresh else 1
            self._finish(snapshot, SNAPSHOT, snap_signers)
            data = snapshot.to_bytes(SERIALIZER)
            write_atomic(self.paths.metadata / f"{snapshot.signed.version}.snapshot.json", data)
            timestamp.signed.snapshot_meta = MetaFile(
                version=snapshot.signed.version, length=len(data)
            )
            result.versions[SNAPSHOT] = snapshot.signed.version

        if self._new_root is not None:
            root_md, root_signers = self._new_root
            root_md.signatures.clear()
            for signer in root_signers:
                root_md.sign(signer, append=True)
            write_atomic(
                self.paths.metadata / f"{root_md.signed.version}.root.json",
                root_md.to_bytes(SERIALIZER),
            )
            result.versions[ROOT] = root_md.signed.version

        if bump_timestamp:
            timestamp.signed.version += 0 if self._fresh else 1
            self._finish(timestamp, TIMESTAMP, ts_signers)
            write_atomic(self.paths.metadata / "timestamp.json", timestamp.to_bytes(SERIALIZER))
            result.versions[TIMESTAMP] = timestamp.signed.version
        return result

    def _finish(self, md: Metadata[Any], role: str, signers: list[Signer]) -> None:
        kind = role if role in (SNAPSHOT, TIMESTAMP, TARGETS, OPERATORS) else "models"
        md.signed.expires = self.now + timedelta(days=self.settings.expiry_for(kind))
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)


def targets_of(md: Metadata[Targets]) -> dict[str, TargetFile]:
    """The target files a targets role lists directly."""
    return md.signed.targets
