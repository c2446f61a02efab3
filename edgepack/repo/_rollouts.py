"""The rollouts the operators asked ``fleet watch`` to watch: ``WORKDIR/rollouts.json``.

``edgepack promote … --halt-on-failure 5%`` (or ``--halt-on-confidence-drop 0.05``,
``--halt-on-drift-alerts 20%``: the monitoring policies) records a :class:`Policy` beside the
repository (never in the signed channel document, whose format does not change):
per model and channel, the release being watched, its policy, where it stands
(:data:`STATES`) and since when. ``fleet watch`` reads it, decides, and moves it
on; ``promote`` without policy options, ``rollback`` and ``revoke`` by hand end it.

Every change happens under the repository's publish lock, so the record moves
together with the channel documents it describes. The file is written atomically
and parsed strictly: a damaged file is one clear error, never a silent reset.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from edgepack import channel as ch
from edgepack._atomic import write_atomic
from edgepack.errors import InvalidInputError

FORMAT = "edgepack-rollouts"
FORMAT_VERSION = 1
FILENAME = "rollouts.json"
MAX_FILE_BYTES = 1024 * 1024

WATCHING = "watching"
HALTED = "halted"
ROLLED_BACK = "rolled-back"
COMPLETE = "complete"
SUPERSEDED = "superseded"
STATES = (WATCHING, HALTED, ROLLED_BACK, COMPLETE, SUPERSEDED)
"""``superseded``: the channel moved on outside the watcher (another version promoted)."""
ON_FAILURE = ("halt", "rollback")
OPTIONAL_POLICY_KEYS = ("halt_on_confidence_drop", "halt_on_drift_alerts")
"""Policy keys a file may lack (older files) and that are written only when set."""

_DURATION_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class BadOptionError(InvalidInputError):
    """A command-line option's value is not usable: bad usage, exit code 2 like click's."""

    exit_code = 2


@dataclass(frozen=True)
class Policy:
    """When a watched rollout halts, rolls back or widens.

    ``halt_on_failure`` is a fraction in (0, 1]: the failure rate among fresh
    devices at which the rollout stops, once at least ``min_devices`` fresh
    devices report on it; ``widen`` the rollout percentages to move through,
    each after ``widen_after_s`` seconds healthy at the step before.
    """

    halt_on_failure: float | None
    min_devices: int = 1
    on_failure: str = "halt"
    widen: tuple[float, ...] = ()
    widen_after_s: float = 0.0
    halt_on_confidence_drop: float | None = None
    halt_on_drift_alerts: float | None = None
    """``halt_on_confidence_drop``: an absolute drop in mean confidence (0 to 1) of the
    release against the previous revision on the same devices, over at least
    ``min_devices`` fresh devices with that comparison; ``halt_on_drift_alerts``: a
    fraction of fresh devices reporting monitoring that raise an alert. None: unused.
    Both are written to the file only when set, so a file without them is unchanged."""

    def check(self, rollout: float) -> Policy:
        """Return the policy if it fits a rollout starting at ``rollout`` percent, else raise."""
        thresholds = (
            ("--halt-on-failure", self.halt_on_failure),
            ("--halt-on-confidence-drop", self.halt_on_confidence_drop),
            ("--halt-on-drift-alerts", self.halt_on_drift_alerts),
        )
        if all(h is None for _, h in thresholds):
            raise BadOptionError(
                "a watched rollout needs --halt-on-failure, --halt-on-confidence-drop "
                "or --halt-on-drift-alerts"
            )
        for option, h in thresholds:
            if h is None:
                continue
            if isinstance(h, bool) or not isinstance(h, int | float) or not math.isfinite(h):
                raise BadOptionError(f"{option} must be a number, not {h!r}")
            if not 0 < h <= 1:
                shown = f"{h:g}" if option == "--halt-on-confidence-drop" else f"{h * 100:g}%"
                raise BadOptionError(
                    f"{option} must be more than 0 and at most 1 (100%), not {shown}"
                )
        if isinstance(self.min_devices, bool) or not isinstance(self.min_devices, int):
            raise BadOptionError(f"--min-devices must be a whole number, not {self.min_devices!r}")
        if self.min_devices < 1:
            raise BadOptionError(f"--min-devices must be at least 1, not {self.min_devices}")
        if self.on_failure not in ON_FAILURE:
            raise BadOptionError(f"--on-failure must be halt or rollback, not {self.on_failure!r}")
        previous = rollout
        for step in self.widen:
            if not math.isfinite(step) or not previous < step <= 100:
                raise BadOptionError(
                    f"--widen steps must grow from the rollout ({rollout:g}%) to at most 100%, "
                    f"not {', '.join(f'{s:g}' for s in self.widen)}"
                )
            previous = step
        if self.widen and not (math.isfinite(self.widen_after_s) and self.widen_after_s > 0):
            raise BadOptionError("--widen needs --widen-after, a duration such as 6h")
        if not self.widen and self.widen_after_s:
            raise BadOptionError("--widen-after needs --widen, the steps to widen through")
        return self

    def next_step(self, step: float) -> float | None:
        """The first widening step above ``step``, or None when there is none."""
        return next((s for s in self.widen if s > step), None)


@dataclass(frozen=True)
class Rollout:
    """One watched rollout: a model channel's release, its policy and where it stands."""

    model: str
    channel: str
    version: str
    policy: Policy
    state: str
    step: float
    since: float
    reason: str

    @property
    def key(self) -> tuple[str, str]:
        """The (model, channel) the record is for: one record each."""
        return (self.model, self.channel)

    def moved(self, state: str, reason: str, now: float, step: float | None = None) -> Rollout:
        """The record after a change: new state (and step), ``since`` now."""
        return replace(
            self, state=state, reason=reason, since=now, step=self.step if step is None else step
        )

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON data (percentages as plain numbers)."""
        data = asdict(self)
        data["policy"]["widen"] = list(self.policy.widen)
        for optional in OPTIONAL_POLICY_KEYS:
            if data["policy"][optional] is None:
                del data["policy"][optional]
        return data


# --- parsing options ---


def parse_percent(text: str, option: str) -> float:
    """``"5%"`` or ``"5"`` → 5.0 (percent); anything else is a one-line usage error."""
    raw = text.strip().removesuffix("%").strip()
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0 <= value <= 100:
        raise BadOptionError(f"{option} takes a percentage from 0 to 100 (5% or 5), not {text!r}")
    return value


def parse_steps(text: str, option: str = "--widen") -> tuple[float, ...]:
    """``"25,50,100"`` → (25.0, 50.0, 100.0); order is checked by :meth:`Policy.check`."""
    parts = [p for p in (s.strip() for s in text.split(",")) if p]
    if not parts:
        raise BadOptionError(f"{option} takes percentages separated by commas, e.g. 25,50,100")
    return tuple(parse_percent(p, option) for p in parts)


def parse_duration(text: str, option: str) -> float:
    """``30s``, ``10m``, ``6h``, ``2d`` (or plain seconds) → seconds, more than zero."""
    raw = text.strip().lower()
    match = _DURATION_RE.fullmatch(raw)
    seconds = math.nan
    if match:
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    elif re.fullmatch(r"[0-9]+(?:\.[0-9]+)?", raw):
        seconds = float(raw)
    if not math.isfinite(seconds) or seconds <= 0:
        raise BadOptionError(f"{option} takes a duration such as 30s, 10m, 6h or 2d, not {text!r}")
    return seconds


def parse_confidence_drop(text: str, option: str = "--halt-on-confidence-drop") -> float:
    """``"0.05"`` → 0.05: an absolute drop in mean confidence, more than 0 and at most 1.

    A percentage is refused rather than guessed at (it could be read as relative)."""
    try:
        value = float(text.strip())
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0 < value <= 1:
        raise BadOptionError(
            f"{option} takes a drop in mean confidence from 0 to 1 (e.g. 0.05), not {text!r}"
        )
    return value


def make_policy(
    *,
    halt_on_failure: str | None,
    min_devices: int | None,
    on_failure: str | None,
    widen: str | None,
    widen_after: str | None,
    rollout: float,
    halt_on_confidence_drop: str | None = None,
    halt_on_drift_alerts: str | None = None,
) -> Policy | None:
    """The policy promote's options describe, checked; None when no option was given."""
    given = (halt_on_failure, min_devices, on_failure, widen, widen_after)
    monitored = (halt_on_confidence_drop, halt_on_drift_alerts)
    if all(v is None for v in given + monitored):
        return None
    if halt_on_failure is None and all(v is None for v in monitored):
        raise BadOptionError(
            "a watched rollout needs --halt-on-failure (e.g. 5%), --halt-on-confidence-drop "
            "or --halt-on-drift-alerts",
            hint="--min-devices, --on-failure, --widen and --widen-after go with it",
        )
    policy = Policy(
        halt_on_failure=None
        if halt_on_failure is None
        else parse_percent(halt_on_failure, "--halt-on-failure") / 100,
        halt_on_confidence_drop=None
        if halt_on_confidence_drop is None
        else parse_confidence_drop(halt_on_confidence_drop),
        halt_on_drift_alerts=None
        if halt_on_drift_alerts is None
        else parse_percent(halt_on_drift_alerts, "--halt-on-drift-alerts") / 100,
        min_devices=1 if min_devices is None else min_devices,
        on_failure="halt" if on_failure is None else on_failure,
        widen=() if widen is None else parse_steps(widen),
        widen_after_s=0.0 if widen_after is None else parse_duration(widen_after, "--widen-after"),
    )
    return policy.check(rollout)


# --- the file ---


def rollouts_path(workdir: Path) -> Path:
    """Where the watched rollouts of a repository are kept."""
    return workdir / FILENAME


def load(workdir: Path) -> dict[tuple[str, str], Rollout]:
    """Every recorded rollout by (model, channel); empty when the file does not exist."""
    path = rollouts_path(workdir)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    return parse(data, str(path))


def save(workdir: Path, rollouts: dict[tuple[str, str], Rollout]) -> None:
    """Replace the file atomically (callers hold the repository's publish lock)."""
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "rollouts": [r.to_dict() for _, r in sorted(rollouts.items())],
    }
    text = json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n"
    write_atomic(rollouts_path(workdir), text.encode("utf-8"), mode=0o644)


def parse(data: bytes, where: str = FILENAME) -> dict[tuple[str, str], Rollout]:
    """Parse and strictly check a rollouts file; one InvalidInputError on anything wrong."""
    if len(data) > MAX_FILE_BYTES:
        raise InvalidInputError(f"{where} is larger than {MAX_FILE_BYTES} bytes")

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                raise ValueError(f"duplicate key {k!r}")
            out[k] = v
        return out

    def constant(name: str) -> None:
        raise ValueError(f"{name} is not allowed")

    try:
        raw = json.loads(data.decode("utf-8"), object_pairs_hook=pairs, parse_constant=constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidInputError(f"{where} is not valid JSON: {exc}") from None
    top = _object(raw, where)
    _exact(top, {"format", "format_version", "rollouts"}, where)
    if top["format"] != FORMAT:
        raise InvalidInputError(f"{where} is not a rollouts file: format is {top['format']!r}")
    if top["format_version"] != FORMAT_VERSION or isinstance(top["format_version"], bool):
        raise InvalidInputError(
            f"{where} has unsupported format_version {top['format_version']!r}",
            hint="upgrade edgepack",
        )
    if not isinstance(top["rollouts"], list):
        raise InvalidInputError(f"{where}: rollouts must be a list")
    out: dict[tuple[str, str], Rollout] = {}
    for i, item in enumerate(top["rollouts"]):
        record = _record(item, f"{where}: rollouts[{i}]")
        if record.key in out:
            raise InvalidInputError(f"{where} lists {record.model}/{record.channel} twice")
        out[record.key] = record
    return out


def _record(raw: object, where: str) -> Rollout:
    obj = _object(raw, where)
    _exact(
        obj, {"model", "channel", "version", "policy", "state", "step", "since", "reason"}, where
    )
    try:
        model = ch.check_name(_str(obj["model"], where))
        channel = ch.check_channel_name(_str(obj["channel"], where))
        version = ch.check_version(_str(obj["version"], where))
    except InvalidInputError as exc:
        raise InvalidInputError(f"{where}: {exc.message}") from None
    state = _str(obj["state"], where)
    if state not in STATES:
        raise InvalidInputError(f"{where}: unknown state {state!r}")
    step = _num(obj["step"], f"{where}.step")
    since = _num(obj["since"], f"{where}.since")
    if not 0 <= step <= 100:
        raise InvalidInputError(f"{where}.step must be from 0 to 100")
    pol = _object(obj["policy"], f"{where}.policy")
    _exact(
        {k: v for k, v in pol.items() if k not in OPTIONAL_POLICY_KEYS},
        {"halt_on_failure", "min_devices", "on_failure", "widen", "widen_after_s"},
        f"{where}.policy",
    )
    widen = pol["widen"]
    if not isinstance(widen, list):
        raise InvalidInputError(f"{where}.policy.widen must be a list")
    optional = {
        k: None if pol.get(k) is None else _num(pol[k], f"{where}.policy.{k}")
        for k in ("halt_on_failure", *OPTIONAL_POLICY_KEYS)
    }
    policy = Policy(
        halt_on_failure=optional["halt_on_failure"],
        halt_on_confidence_drop=optional["halt_on_confidence_drop"],
        halt_on_drift_alerts=optional["halt_on_drift_alerts"],
        min_devices=pol["min_devices"],
        on_failure=_str(pol["on_failure"], f"{where}.policy.on_failure"),
        widen=tuple(_num(s, f"{where}.policy.widen") for s in widen),
        widen_after_s=_num(pol["widen_after_s"], f"{where}.policy.widen_after_s"),
    )
    try:
        policy.check(0.0)  # the steps as recorded; the rollout may have widened since
    except BadOptionError as exc:
        raise InvalidInputError(f"{where}.policy: {exc.message}") from None
    reason = _str(obj["reason"], f"{where}.reason")
    return Rollout(model, channel, version, policy, state, step, since, reason)


def _object(raw: object, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise InvalidInputError(f"{where} must be a JSON object")
    return raw


def _exact(obj: dict[str, Any], keys: set[str], where: str) -> None:
    missing = keys - obj.keys()
    extra = obj.keys() - keys
    if missing:
        raise InvalidInputError(f"{where} lacks {', '.join(sorted(missing))}")
    if extra:
        raise InvalidInputError(f"{where} has unknown field(s) {', '.join(sorted(extra))}")


def _str(raw: object, where: str) -> str:
    if not isinstance(raw, str):
        raise InvalidInputError(f"{where} must be a string")
    return raw


def _num(raw: object, where: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        raise InvalidInputError(f"{where} must be a finite number")
    return float(raw)


# --- what the operators' own commands do to the records (under the publish lock) ---


def record_promote(
    workdir: Path, docs: list[ch.ChannelDocument], policy: Policy | None, now: float
) -> None:
    """After a promote: watch the new release under ``policy``, or stop watching the channel."""
    rollouts = load(workdir)
    changed = False
    for doc in docs:
        key = (doc.model, doc.channel)
        if policy is None or doc.current is None:
            changed |= rollouts.pop(key, None) is not None
            continue
        rollouts[key] = Rollout(
            doc.model,
            doc.channel,
            doc.current.version,
            policy,
            WATCHING,
            doc.current.rollout,
            now,
            f"promoted at {doc.current.rollout:g}% (channel sequence {doc.sequence})",
        )
        changed = True
    if changed:
        save(workdir, rollouts)


def record_ended(
    workdir: Path, model: str, channels: list[str], version: str | None, reason: str, now: float
) -> None:
    """After a rollback or revoke by hand: the watched rollouts it touched end, rolled back.

    ``version`` None means whatever release each channel watched (a rollback);
    otherwise only records of that version end (a revoke).
    """
    rollouts = load(workdir)
    changed = False
    for channel in channels:
        record = rollouts.get((model, channel))
        if record is None or record.state not in (WATCHING, HALTED):
            continue
        if version is not None and record.version != version:
            continue
        rollouts[record.key] = record.moved(ROLLED_BACK, reason, now)
        changed = True
    if changed:
        save(workdir, rollouts)
