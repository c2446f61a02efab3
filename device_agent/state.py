"""The update state machine as a table, and its journal ``DATA/state.json``.

Like Mender's client, each model's update is a sequence of named states; the
journal records a state *on entry*, before the state's side effect, so a
restart knows what may have been half done. Like RAUC, two facts are kept
apart: which revision is active (the ``current`` symlink on disk) and which
revisions are known good (passed verification and their health check, here in
the journal). Everything in this module is pure bookkeeping except
:meth:`Journal.save`, which writes the journal atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar, cast

from device_agent import _atomic
from device_agent._crashpoint import crashpoint
from device_agent.errors import AgentError

JOURNAL_NAME = "state.json"
PREVIOUS_SUFFIX = ".prev"  # the journal as the save before the last one left it
JOURNAL_FORMAT = 1


class State(str, Enum):
    """States of one model's update; ``idle`` between updates."""

    IDLE = "idle"
    CHECKING = "checking"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGING = "staging"
    HEALTH_CHECKING = "health-checking"
    SWITCHING = "switching"
    COMMITTED = "committed"


# Allowed transitions. IDLE is where a failed update goes (after recording why).
TRANSITIONS: dict[State, frozenset[State]] = {
    State.IDLE: frozenset({State.CHECKING, State.SWITCHING}),
    State.CHECKING: frozenset({State.DOWNLOADING, State.VERIFYING, State.SWITCHING, State.IDLE}),
    State.DOWNLOADING: frozenset({State.VERIFYING, State.IDLE}),
    State.VERIFYING: frozenset({State.STAGING, State.IDLE}),
    State.STAGING: frozenset({State.HEALTH_CHECKING, State.IDLE}),
    State.HEALTH_CHECKING: frozenset({State.SWITCHING, State.IDLE}),
    State.SWITCHING: frozenset({State.COMMITTED}),
    State.COMMITTED: frozenset({State.CHECKING, State.SWITCHING, State.IDLE}),
}


class Recovery(str, Enum):
    """What start-up recovery does for a journal left in a given state."""

    NOTHING = "nothing"  # no side effect was under way
    KEEP_PARTIAL = "keep-partial"  # the partial download resumes on the next poll
    DISCARD_STAGING = "discard-staging"  # an unverified or unhealthy candidate is removed
    FINISH_SWITCH = "finish-switch"  # the candidate is known good: complete the switch


RECOVERY: dict[State, Recovery] = {
    State.IDLE: Recovery.NOTHING,
    State.CHECKING: Recovery.NOTHING,
    State.DOWNLOADING: Recovery.KEEP_PARTIAL,
    State.VERIFYING: Recovery.DISCARD_STAGING,
    State.STAGING: Recovery.DISCARD_STAGING,
    State.HEALTH_CHECKING: Recovery.DISCARD_STAGING,
    State.SWITCHING: Recovery.FINISH_SWITCH,
    State.COMMITTED: Recovery.NOTHING,
}


@dataclass
class Update:
    """The release an update is moving to."""

    target: str
    version: str
    sha256: str
    length: int
    revision: str
    previous: str | None
    attempts: int = 0


@dataclass
class Revision:
    """An installed revision. ``healthy`` is the known-good fact, set only after its check."""

    version: str
    sha256: str
    target: str
    healthy: bool = False
    installed_at: float = 0.0
    model_path: str = "model.onnx"


@dataclass
class ModelJournal:
    """Everything the agent remembers about one model between runs."""

    state: State = State.IDLE
    update: Update | None = None
    revisions: dict[str, Revision] = field(default_factory=dict)
    # A release whose model misbehaved here (health, loading safety, verdicts): version -> why.
    failed: dict[str, str] = field(default_factory=dict)
    # Bundle bytes that could not be used (signature, decryption, format): sha256 -> why.
    # Keyed by bytes, so the same version re-encrypted or re-signed is tried again.
    failed_bundles: dict[str, str] = field(default_factory=dict)
    revoked: list[str] = field(default_factory=list)
    channel_sequence: int = 0
    confirm: dict[str, Any] | None = None  # {"revision", "previous", "deadline"}
    entered_at: float = 0.0
    # What the agent found damaged at rest and how it recovered (newest last, a few kept).
    repairs: list[str] = field(default_factory=list)

    def healthy_revisions(self) -> list[str]:
        """Known-good revisions, oldest install first."""
        good = [(r.installed_at, name) for name, r in self.revisions.items() if r.healthy]
        return [name for _, name in sorted(good)]

    def forget_failures(self, *, versions: bool = True) -> list[str]:
        """Clear the marks of releases that failed here (``retry``, a changed enrolment).

        The refused bundles always; the failed versions (health, verdicts, crash
        loops) when ``versions``, with the count of interrupted tries. Returns
        what was cleared: versions as they are, bundles as ``sha256:`` and 12 hex.
        """
        cleared = [f"sha256:{sha[:12]}" for sha in self.failed_bundles]
        self.failed_bundles.clear()
        if versions:
            cleared = [*self.failed, *cleared]
            self.failed.clear()
            if self.update is not None:
                self.update.attempts = 0
        return cleared

    def revision_for(self, sha256: str) -> str | None:
        """The known-good installed revision of a bundle, if any."""
        for name, rev in self.revisions.items():
            if rev.sha256 == sha256 and rev.healthy:
                return name
        return None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON form."""
        data = asdict(self)
        data["state"] = self.state.value
        return data

    @classmethod
    def from_json(cls, data: object, where: str = "journal") -> ModelJournal:
        """Inverse of :meth:`to_json`; :class:`JournalError` for anything it would not write."""
        obj = _object(data, where)
        _only(obj, {f.name for f in dataclasses.fields(cls)}, where)
        try:
            state = State(obj.get("state", "idle"))
        except ValueError:
            raise JournalError(f"{where}: unknown state {obj.get('state')!r}") from None
        update = obj.get("update")
        confirm = obj.get("confirm")
        revisions = _object(obj.get("revisions", {}), f"{where}.revisions")
        return cls(
            state=state,
            update=None if update is None else _record(Update, update, f"{where}.update"),
            revisions={
                k: _record(Revision, v, f"{where}.revisions.{k}") for k, v in revisions.items()
            },
            failed=_strings(obj.get("failed", {}), f"{where}.failed"),
            failed_bundles=_strings(obj.get("failed_bundles", {}), f"{where}.failed_bundles"),
            revoked=_string_list(obj.get("revoked", []), f"{where}.revoked"),
            channel_sequence=_typed(
                obj.get("channel_sequence", 0), "int", f"{where}.channel_sequence"
            ),
            confirm=None if confirm is None else _confirm(confirm, f"{where}.confirm"),
            entered_at=_typed(obj.get("entered_at", 0.0), "float", f"{where}.entered_at"),
            repairs=_string_list(obj.get("repairs", []), f"{where}.repairs"),
        )


class JournalError(AgentError):
    """``DATA/state.json`` is not a journal this agent wrote: torn, truncated or edited."""

    exit_code = 3


# The types a journal record's fields may hold, by their annotation (kept as text).
_KINDS: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "str | None": (str, type(None)),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
}
_R = TypeVar("_R", Update, Revision)


def _object(raw: object, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise JournalError(f"{where} must be a JSON object")
    return raw


def _only(obj: dict[str, Any], known: set[str], where: str) -> None:
    unknown = obj.keys() - known
    if unknown:
        raise JournalError(f"{where} has unknown field(s) {', '.join(sorted(unknown))}")


def _typed(value: Any, kind: str, where: str) -> Any:
    kinds = _KINDS[kind]
    if not isinstance(value, kinds) or (isinstance(value, bool) and kind != "bool"):
        raise JournalError(f"{where} has the wrong type ({type(value).__name__})")
    if kind == "float":
        number = float(cast(float, value))
        if not math.isfinite(number):
            raise JournalError(f"{where} is not a finite number")
        return number
    return value


def _record(cls: type[_R], raw: object, where: str) -> _R:
    obj = _object(raw, where)
    fields = dataclasses.fields(cls)
    _only(obj, {f.name for f in fields}, where)
    values: dict[str, Any] = {}
    for f in fields:
        if f.name in obj:
            values[f.name] = _typed(obj[f.name], str(f.type), f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING:
            raise JournalError(f"{where} lacks {f.name!r}")
    return cls(**values)


def _strings(raw: object, where: str) -> dict[str, str]:
    obj = _object(raw, where)
    if not all(isinstance(v, str) for v in obj.values()):
        raise JournalError(f"{where} must map names to strings")
    return dict(obj)


def _string_list(raw: object, where: str) -> list[str]:
    if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
        raise JournalError(f"{where} must be a list of strings")
    return list(raw)


def _confirm(raw: object, where: str) -> dict[str, Any]:
    obj = _object(raw, where)
    if obj.keys() != {"revision", "previous", "deadline"}:
        raise JournalError(f"{where} must hold exactly revision, previous and deadline")
    return {
        "revision": _typed(obj["revision"], "str", f"{where}.revision"),
        "previous": _typed(obj["previous"], "str | None", f"{where}.previous"),
        "deadline": _typed(obj["deadline"], "float", f"{where}.deadline"),
    }


class IllegalTransitionError(AgentError):
    """The agent tried a transition the table does not allow (a bug, reported loudly)."""


class Journal:
    """The state of every model, persisted on each state entry."""

    def __init__(self, path: Path, models: dict[str, ModelJournal] | None = None) -> None:
        self.path = path
        self.models: dict[str, ModelJournal] = models or {}
        self.recovered: str | None = None  # what load() did about a damaged journal
        self._saved = self._fingerprint() if models else ""

    @classmethod
    def load(cls, data_dir: Path) -> Journal:
        """Read ``DATA/state.json`` (an empty journal when there is none).

        A damaged journal is not a crash loop: the copy kept by the previous
        :meth:`save` is read instead, and when that is damaged too the journal
        starts empty (the agent then rebuilds what it can from the revisions on
        disk). ``recovered`` says what happened, for the status.
        """
        path = data_dir / JOURNAL_NAME
        try:
            return cls.read_file(path)
        except JournalError as damaged:
            previous = path.with_name(JOURNAL_NAME + PREVIOUS_SUFFIX)
            try:
                journal = cls.read_file(previous, path)
                how = "restored the copy kept by the previous save"
            except JournalError:
                journal, how = cls(path), "started from an empty journal"
            journal.recovered = f"{damaged.message}; {how}"
            return journal

    @classmethod
    def read_file(cls, path: Path, target: Path | None = None) -> Journal:
        """Parse the journal file ``path`` strictly (into a journal that saves to ``target``);
        :class:`JournalError` for anything this agent would not have written."""
        target = target or path
        try:
            raw = _atomic.read_json(path)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise JournalError(
                f"{path} is not valid JSON (torn by the storage or edited by hand)",
                hint="restore it from a backup, or move it aside to start from an empty journal",
            ) from None
        if raw is None:
            if target != path:  # no previous copy: nothing to restore
                raise JournalError(f"{path} does not exist")
            return cls(path)
        top = _object(raw, str(path))
        _only(top, {"format", "models"}, str(path))
        if top.get("format", JOURNAL_FORMAT) != JOURNAL_FORMAT or isinstance(
            top.get("format"), bool
        ):
            raise JournalError(f"{path} has an unsupported format {top.get('format')!r}")
        raw_models = _object(top.get("models", {}), f"{path} models")
        models = {
            k: ModelJournal.from_json(v, f"{path} model {k!r}") for k, v in raw_models.items()
        }
        return cls(target, models)

    def model(self, name: str) -> ModelJournal:
        """The journal of one model, created empty on first use."""
        return self.models.setdefault(name, ModelJournal())

    def _document(self) -> dict[str, Any]:
        return {
            "format": JOURNAL_FORMAT,
            "models": {k: v.to_json() for k, v in sorted(self.models.items())},
        }

    def _fingerprint(self) -> str:
        doc = self._document()
        for m in doc["models"].values():
            m.pop("entered_at", None)
        return json.dumps(doc, sort_keys=True)

    def save(self) -> None:
        """Write the whole journal atomically, keeping what it replaces as the previous copy.

        The previous copy is a second name of the file this agent last wrote (a hard
        link, renamed into place): no extra write, and always a journal it could read.
        """
        if self.path.is_file():
            keep = self.path.with_name(JOURNAL_NAME + PREVIOUS_SUFFIX)
            link = keep.with_name(keep.name + ".tmp")
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            with contextlib.suppress(OSError):
                os.link(self.path, link)
                os.replace(link, keep)
        _atomic.write_json(self.path, self._document())
        self._saved = self._fingerprint()
        self.recovered = None

    def save_if_changed(self) -> None:
        """Write the journal only when its content differs from what is on disk."""
        if self._fingerprint() != self._saved:
            self.save()

    def enter(self, name: str, state: State, *, update: Update | None = None) -> None:
        """Record entry into ``state`` *before* its side effect, then save.

        ``checking`` has no side effect to recover from, so it is not written,
        and ``idle`` is written only when something changed: a poll with
        nothing new writes nothing to the journal (flash storage wears).
        Raises :class:`IllegalTransitionError` for a transition not in the table.
        """
        mj = self.model(name)
        if state is not mj.state and state not in TRANSITIONS[mj.state]:
            raise IllegalTransitionError(
                f"{name}: transition {mj.state.value} -> {state.value} is not allowed"
            )
        mj.state = state
        mj.entered_at = time.time()
        if update is not None:
            mj.update = update
        if state is State.IDLE:
            self.save_if_changed()
        elif state is not State.CHECKING:
            self.save()
        crashpoint(state.value)
