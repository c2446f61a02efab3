"""A small real TUF repository on disk for the agent's tests.

Same shape as edgepack's repository (consistent snapshots; ``targets``
delegates ``channels/*`` to an operators role and ``models/NAME/*`` to a team
role; hash-prefixed target files) but self-contained, so the agent's tests do
not depend on the repository tool's state of progress. Metadata is signed
with real Ed25519 keys.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from securesystemslib.signer._crypto_signer import CryptoSigner
from securesystemslib.signer._key import Key
from tuf.api._payload import (
    DelegatedRole,
    Delegations,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.metadata import Metadata
from tuf.api.serialization.json import JSONSerializer

from edgepack import bundle
from edgepack import channel as ch

OPERATORS = "operators"
TEAM = "team"


class TufRepo:
    """Write metadata and targets under ``public/``; every change bumps versions and re-signs."""

    def __init__(self, public: Path, model: str, *, expires_days: float = 30) -> None:
        self.public = public
        self.meta_dir = public / "metadata"
        self.targets_dir = public / "targets"
        self.meta_dir.mkdir(parents=True, exist_ok=True)
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.expires_days = expires_days
        self.signers = {
            r: CryptoSigner.generate_ed25519()
            for r in ("root", "targets", "snapshot", "timestamp", OPERATORS, TEAM)
        }
        self.root = Metadata(Root(expires=self._expiry(365), consistent_snapshot=True))
        for role in ("root", "targets", "snapshot", "timestamp"):
            self.root.signed.add_key(self.signers[role].public_key, role)
        self.targets = Metadata(Targets(expires=self._expiry()))
        keys: dict[str, Key] = {
            self.signers[r].public_key.keyid: self.signers[r].public_key for r in (OPERATORS, TEAM)
        }
        self.targets.signed.delegations = Delegations(
            keys=keys,
            roles={
                OPERATORS: DelegatedRole(
                    OPERATORS, [self.signers[OPERATORS].public_key.keyid], 1, True, ["channels/*/*"]
                ),
                TEAM: DelegatedRole(
                    TEAM, [self.signers[TEAM].public_key.keyid], 1, True, [f"models/{model}/*"]
                ),
            },
        )
        self.delegated = {r: Metadata(Targets(expires=self._expiry())) for r in (OPERATORS, TEAM)}
        self.snapshot = Metadata(Snapshot(expires=self._expiry()))
        self.timestamp = Metadata(Timestamp(expires=self._expiry()))
        self.doc = ch.new_document(model, "stable")
        self._write("root", self.root, versioned=True)
        self.commit(set())

    def _expiry(self, days: float | None = None) -> datetime:
        d = self.expires_days if days is None else days
        return (datetime.now(timezone.utc) + timedelta(days=d)).replace(microsecond=0)

    def _write(self, role: str, md: Metadata[Any], *, versioned: bool) -> bytes:
        md.signatures.clear()
        md.sign(self.signers[role if role in self.signers else TEAM])
        data = md.to_bytes(JSONSerializer(compact=False))
        name = f"{md.signed.version}.{role}.json" if versioned else f"{role}.json"
        (self.meta_dir / name).write_bytes(data)
        return data

    def add_target(
        self, role: str, path: str, data: bytes, custom: dict[str, Any] | None = None
    ) -> None:
        """Store a target file (hash-prefixed name) and list it in ``role``."""
        tf = TargetFile.from_data(path, data, ["sha256"])
        if custom is not None:
            tf.unrecognized_fields["custom"] = custom
        digest = tf.hashes["sha256"]
        dest = self.targets_dir / Path(path).parent / f"{digest}.{Path(path).name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        self.delegated[role].signed.targets[path] = tf

    def commit(self, changed: set[str]) -> None:
        """Bump and sign the changed delegated roles, targets, snapshot and timestamp."""
        for role in sorted(changed):
            md = self.delegated[role]
            md.signed.version += 1
            md.signed.expires = self._expiry()
        for role, md in self.delegated.items():
            if (
                md.signed.version == 1 and not (self.meta_dir / f"1.{role}.json").exists()
            ) or role in changed:
                self._write(role, md, versioned=True)
            self.snapshot.signed.meta[f"{role}.json"] = MetaFile(md.signed.version)
        if not (self.meta_dir / f"{self.targets.signed.version}.targets.json").exists():
            self._write("targets", self.targets, versioned=True)
        self.snapshot.signed.meta["targets.json"] = MetaFile(self.targets.signed.version)
        self.snapshot.signed.version += 1
        self.snapshot.signed.expires = self._expiry()
        snap = self._write("snapshot", self.snapshot, versioned=True)
        self.timestamp.signed.snapshot_meta = MetaFile(
            self.snapshot.signed.version,
            length=len(snap),
            hashes={"sha256": hashlib.sha256(snap).hexdigest()},
        )
        self.refresh_timestamp()

    def refresh_timestamp(self, expires: datetime | None = None) -> None:
        """Re-sign timestamp.json (with a chosen expiry, e.g. in the past)."""
        self.timestamp.signed.version += 1
        self.timestamp.signed.expires = expires or self._expiry()
        self._write("timestamp", self.timestamp, versioned=False)

    # -- what operators and teams do ------------------------------------------------
    def add_bundle(self, path: Path, version: str, profile: str = "any") -> str:
        """Publish a bundle file as a team target; return its target path."""
        target = f"models/{self.model}/{path.name}"
        info = bundle.read_info(path)
        custom = {  # as edgepack's repository describes a bundle (repo/_models.describe_bundle)
            "name": info.name,
            "version": info.version,
            "profile": info.profile,
            "architectures": list(info.architectures),
            "payload": [{"path": f.path, "size": f.size} for f in info.manifest],
        }
        self.add_target(TEAM, target, path.read_bytes(), custom)
        self.commit({TEAM})
        return target

    def set_channel(self, doc: ch.ChannelDocument) -> None:
        self.doc = doc
        self.add_target(OPERATORS, doc.target_path, doc.to_bytes())
        self.commit({OPERATORS})

    def promote(self, version: str, target: str, *, rollout: float = 100.0) -> None:
        variants = {"any": ch.Variant(target, "any")}
        self.set_channel(ch.promote(self.doc, ch.Release(version, rollout, (), variants)))

    def rollback(self, to_version: str | None = None) -> None:
        self.set_channel(ch.rollback(self.doc, to_version))

    def revoke(self, version: str) -> None:
        self.set_channel(ch.revoke(self.doc, version))
