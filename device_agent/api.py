"""The application's API: open the active model of a followed model name.

Applications may also read ``DATA/models/NAME/current/`` directly; this helper
adds the agent's loading-safety checks and finds the model file inside the
revision.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from device_agent import safeload
from device_agent.config import resolve_data_dir
from device_agent.errors import CorruptRevisionError, NoRevisionError
from device_agent.slots import Slots
from device_agent.state import Journal

# What applications may pass as ``data_dir``: a Path, a str, any os.PathLike.
DataDir = str | os.PathLike[str] | None


def _active(name: str, data_dir: DataDir) -> tuple[Path, str]:
    data = resolve_data_dir(None if data_dir is None else Path(data_dir))
    slots = Slots(data, name)
    revision = slots.current()
    if revision is None:
        raise NoRevisionError(
            f"no active revision of {name} in {data}",
            hint="wait for `edgepack-agent run` to install one, or check `edgepack-agent status`",
        )
    problem = slots.verify(revision)
    if problem is not None:
        raise CorruptRevisionError(
            f"the active revision {revision} of {name} is damaged: {problem}",
            hint="`edgepack-agent run --once` falls back to an intact revision and reinstalls",
        )
    record = Journal.load(data).model(name).revisions.get(revision)
    return slots.revision_dir(revision), record.model_path if record else "model.onnx"


def active_model_path(name: str, data_dir: DataDir = None) -> Path:
    """The path of the active model file of ``name``, after the safety checks."""
    revision_dir, model_rel = _active(name, data_dir)
    return safeload.check_model(revision_dir, model_rel)


def open_session(name: str, data_dir: DataDir = None, providers: list[str] | None = None) -> Any:
    """An onnxruntime ``InferenceSession`` of the active revision of ``name``, loaded by path.

    The revision's files are first checked against the signed manifest kept at
    install: a flipped bit or a deleted file raises :class:`CorruptRevisionError`
    instead of serving wrong answers."""
    revision_dir, model_rel = _active(name, data_dir)
    return safeload.open_session(revision_dir, model_rel, providers)
