"""``edgepack repo status``: roles, expiries with early warnings, models, channels."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from edgepack.repo import _channels, _models
from edgepack.repo._keys import no_passphrase
from edgepack.repo._settings import OPERATORS, ROOT, SNAPSHOT, TARGETS, TIMESTAMP
from edgepack.repo._store import Store


def _role_entry(
    store: Store, name: str, kind: str, version: int, expires: datetime
) -> dict[str, Any]:
    left = expires - store.now
    days = round(left.total_seconds() / 86400, 2) + 0.0  # + 0.0: never -0.0
    warn = store.settings.warn_for(kind)
    state = "expired" if left <= timedelta(0) else "warning" if days < warn else "ok"
    return {
        "role": name,
        "version": version,
        "expires": expires.isoformat().replace("+00:00", "Z"),
        "days_left": days,
        "state": state,
    }


def status(store: Store) -> dict[str, Any]:
    """A report of the repository as devices see it (read-only; opens no key)."""
    roles = []
    root = store.root()
    roles.append(_role_entry(store, ROOT, ROOT, root.signed.version, root.signed.expires))
    ts = store.timestamp()
    roles.append(_role_entry(store, TIMESTAMP, TIMESTAMP, ts.signed.version, ts.signed.expires))
    snap = store.snapshot()
    roles.append(_role_entry(store, SNAPSHOT, SNAPSHOT, snap.signed.version, snap.signed.expires))
    for name in (TARGETS, OPERATORS):
        md = store.role(name)
        roles.append(_role_entry(store, name, name, md.signed.version, md.signed.expires))
    models = []
    for model in _models.model_names(store):
        role = _models.model_role(model)
        if not store.has_role(role):
            models.append({"name": model, "role": role, "bins": 0, "releases": {}})
            continue
        md = store.role(role)
        entry = _role_entry(store, role, "models", md.signed.version, md.signed.expires)
        bins = _models.bin_count(store, model)
        releases = _models.releases(store, model)  # loads every bin
        if bins:
            earliest = min(
                (store.role(b, parent=role) for b in _models.bin_names(store, model)),
                key=lambda m: m.signed.expires,
            )
            if earliest.signed.expires < md.signed.expires:
                entry = _role_entry(
                    store, role, "models", md.signed.version, earliest.signed.expires
                )
        roles.append(entry)
        models.append(
            {
                "name": model,
                "role": role,
                "bins": bins,
                "releases": {v: sorted(variants) for v, variants in sorted(releases.items())},
            }
        )
    channels = [
        {
            "model": d.model,
            "channel": d.channel,
            "sequence": d.sequence,
            "current": None
            if d.current is None
            else {
                "version": d.current.version,
                "rollout": d.current.rollout,
                "cohorts": list(d.current.cohorts),
                "variants": sorted(d.current.variants),
            },
            "previous": [r.version for r in d.previous],
            "revoked": list(d.revoked),
        }
        for d in _channels.documents(store)
    ]
    warnings = [
        f"role {r['role']} has expired ({r['expires']})"
        if r["state"] == "expired"
        else f"role {r['role']} expires ({r['expires']}, {r['days_left']:g} days left)"
        for r in roles
        if r["state"] != "ok"
    ]
    return {"roles": roles, "models": models, "channels": channels, "warnings": warnings}


def open_status(workdir: Path, now: datetime | None = None) -> dict[str, Any]:
    """Status of the repository at ``workdir`` at time ``now``."""
    from edgepack.repo._ops import open_store

    _paths, _settings, store = open_store(workdir, no_passphrase, now)
    return status(store)
