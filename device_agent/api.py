"""The application's API: open the active model of a followed model name.

Applications may also read ``DATA/models/NAME/current/`` directly; this helper
adds the agent's loading-safety checks and finds the model file inside the
revision.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from device_agent import atrest, keyprotect, monitorstore, safeload
from device_agent.config import AgentConfig, Limits, resolve_data_dir
from device_agent.config import load as load_config
from device_agent.errors import CorruptRevisionError, EncryptedAtRestError, NoRevisionError
from device_agent.slots import Slots
from device_agent.state import Journal
from edgepack.errors import EdgepackError

log = logging.getLogger(__name__)

# What applications may pass as ``data_dir``: a Path, a str, any os.PathLike.
DataDir = str | os.PathLike[str] | None


def _active(name: str, data_dir: DataDir) -> tuple[Path, str]:
    data = resolve_data_dir(None if data_dir is None else Path(data_dir))
    revision_dir, model_rel, _ = _active_in(name, data)
    return revision_dir, model_rel


def _active_in(name: str, data: Path) -> tuple[Path, str, str]:
    slots = Slots(data, name)
    revision = slots.current()
    if revision is None:
        raise NoRevisionError(
            f"no active revision of {name} in {data}",
            hint="wait for `edgepack-agent run` to install one, or check `edgepack-agent status`",
        )
    # An encrypted revision is checked as it is decrypted (every segment's tag, the sealed
    # key bound to its metadata); hashing the whole bundle first would only repeat that.
    encrypted = atrest.is_encrypted(slots.revision_dir(revision))
    problem = None if encrypted else slots.verify(revision)
    if problem is not None:
        raise CorruptRevisionError(
            f"the active revision {revision} of {name} is damaged: {problem}",
            hint="`edgepack-agent run --once` falls back to an intact revision and reinstalls",
        )
    record = Journal.load(data).model(name).revisions.get(revision)
    return slots.revision_dir(revision), record.model_path if record else "model.onnx", revision


def active_model_path(name: str, data_dir: DataDir = None) -> Path:
    """The path of the active model file of ``name``, after the safety checks.

    Only for revisions kept ``plain``: an encrypted revision has no plaintext file to
    point at (:class:`EncryptedAtRestError`); load it with :func:`open_session`.
    """
    revision_dir, model_rel = _active(name, data_dir)
    if atrest.is_encrypted(revision_dir):
        raise EncryptedAtRestError(
            f"{name} is kept encrypted at rest, so it has no model file to open by path",
            hint="load it with device_agent.open_session(), or enrol with `--at-rest plain` "
            "for an application that must read a file",
        )
    return safeload.check_model(revision_dir, model_rel)


def open_session(
    name: str,
    data_dir: DataDir = None,
    providers: list[str] | None = None,
    monitor: bool | None = None,
) -> Any:
    """An onnxruntime ``InferenceSession`` of the active revision of ``name``, loaded by path.

    The revision's files are first checked against the signed manifest kept at
    install: a flipped bit or a deleted file raises :class:`CorruptRevisionError`
    instead of serving wrong answers.

    When monitoring is on (``monitoring = true`` in ``config.toml``, the default;
    ``monitor=False`` turns it off for this session) and the revision's bundle carried
    a monitoring reference, the session is a :class:`device_agent.monitor.MonitoredSession`:
    the same answers, with drift, anomaly and confidence statistics kept per revision."""
    data = resolve_data_dir(None if data_dir is None else Path(data_dir))
    revision_dir, model_rel, revision = _active_in(name, data)
    if atrest.is_encrypted(revision_dir):
        session = _open_encrypted(data, name, revision, revision_dir, model_rel, providers)
    else:
        session = safeload.open_session(revision_dir, model_rel, providers)
    if monitor is False:
        return session
    settings = _settings(data)
    if settings is not None and not settings.monitoring:
        return session
    reference = monitorstore.load_reference(data, name, revision)
    if reference is None:
        return session
    from device_agent.monitor import MonitoredSession  # numpy: only in a monitored application

    limits = settings.limits if settings is not None else Limits()
    try:
        return MonitoredSession(
            session,
            data_dir=data,
            name=name,
            revision=revision,
            reference=reference,
            overrides=settings.monitor_overrides() if settings is not None else None,
            flush_rows=limits.monitor_flush_rows,
            flush_s=limits.monitor_flush_s,
        )
    except Exception as exc:  # a reference that cannot be used must not stop inference
        log.warning("%s %s: monitoring is off for this session: %s", name, revision, exc)
        return session


def _open_encrypted(
    data: Path,
    name: str,
    revision: str,
    revision_dir: Path,
    model_rel: str,
    providers: list[str] | None,
) -> Any:
    """Decrypt an encrypted revision into memory and load it from there.

    The plaintext lives only in this process's memory (the session keeps it alive);
    nothing is written to disk, not even a temporary file.
    """
    from device_agent import memload

    storage_key = keyprotect.load_storage_key(data)
    decrypted = atrest.open_revision(revision_dir, storage_key, name=name, revision=revision)
    return memload.open_session_from_memory(decrypted.files, model_rel, providers)


def _settings(data: Path) -> AgentConfig | None:
    """The device's configuration, or None when this process cannot read it.

    ``config.toml`` is the agent's (mode 0600): an application running as another user
    gets the defaults (monitoring on, the bundle's thresholds), and is told once.
    """
    global _told_defaults
    try:
        return load_config(data)
    except (OSError, EdgepackError) as exc:
        if not _told_defaults:
            _told_defaults = True
            log.info("monitoring uses its defaults: cannot read the agent's config: %s", exc)
        return None


_told_defaults = False
