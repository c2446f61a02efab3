"""The agent's configuration (``DATA/config.toml``) and its limits in one object.

Like python-tuf's ``UpdaterConfig``, every size, count and time bound the agent
enforces is a named field with a default, so a test or an operator changes one
number in one place.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_agent import _atomic, names
from device_agent.errors import NotEnrolledError
from edgepack.errors import InvalidInputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the agent's minimum is 3.10
    import tomli as tomllib

DEFAULT_DATA_DIR = Path("/var/lib/edgepack")
CONFIG_NAME = "config.toml"
MAX_CONFIG_BYTES = 1024 * 1024


@dataclass
class Limits:
    """Bounds on what the agent downloads, how long it waits and how it polls."""

    max_bundle_bytes: int = 8 * 1024**3
    max_channel_bytes: int = 256 * 1024
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    # Connect, send and receive the whole response head within this (0: no deadline).
    response_timeout_s: float = 60.0
    # Slow-retrieval defence: after the grace period the average speed must stay above this.
    min_speed_bps: int = 4096
    slow_grace_s: float = 10.0
    bandwidth_bps: int = 0  # 0: no cap
    chunk_bytes: int = 1024 * 1024
    free_space_margin_bytes: int = 16 * 1024 * 1024
    poll_interval_s: float = 300.0
    poll_jitter: float = 0.2
    backoff_max_s: float = 3600.0
    keep_revisions: int = 2
    confirm_window_s: float = 0.0  # 0: no confirmation window
    health_latency_runs: int = 5
    # The health check runs in a child process: wall-clock limit, and address-space cap
    # (RLIMIT_AS, MiB; 0: none beyond the machine's) so a hostile model cannot exhaust it.
    health_timeout_s: float = 300.0
    # How often a long-running agent re-reads the running revision against its manifest.
    scrub_interval_s: float = 3600.0
    health_memory_mb: int = 0
    # Reports to the fleet service (fleet_url): queued reports kept at most (oldest dropped
    # first), one request's deadline, and the heartbeat when nothing changed.
    report_queue_max: int = 64
    report_timeout_s: float = 10.0
    report_interval_s: float = 900.0
    # Model monitoring in the application: flush its counts to DATA/monitor every this
    # many inferences or seconds, whichever comes first (and when the session closes).
    monitor_flush_rows: int = 1000
    monitor_flush_s: float = 60.0


AT_REST_MODES = ("encrypted", "plain")
KEY_PROTECTIONS = ("file", "tpm")


@dataclass
class AgentConfig:
    """What enrolment decided: where the repository is, who this device is, what it follows."""

    data_dir: Path
    device_id: str
    metadata_url: str
    targets_url: str
    models: list[str] = field(default_factory=list)
    channel: str = "stable"
    cohort: str = ""
    profile: str = "auto"
    architecture: str = ""
    trust_policy: str = ""
    recipient_key: str = ""
    # HTTPS: the PEM CA bundle servers are verified against ("": the system's trust store).
    ca_file: str = ""
    # The HTTP(S) proxy for the repository ("": https_proxy/http_proxy; no_proxy always applies).
    proxy: str = ""
    # The fleet service that takes this device's signed reports ("": no fleet, no reports).
    fleet_url: str = ""
    # Model monitoring (docs/agent.md, "Monitoring"): on for every revision whose bundle
    # carries a reference; the thresholds override the bundle's (0: the bundle's own).
    monitoring: bool = True
    monitor_drift_psi: float = 0.0
    monitor_feature_psi: float = 0.0
    monitor_anomaly_rate: float = 0.0
    monitor_confidence_drop: float = 0.0
    monitor_output_psi: float = 0.0
    monitor_window: int = 0
    # How installed revisions are kept (docs/agent.md, "Models at rest"): "encrypted"
    # keeps the bundle's ciphertext and decrypts into memory when a model is loaded;
    # "plain" writes the decrypted files, for applications that must open a path.
    at_rest: str = "encrypted"
    # What protects the device's keys at rest: "file" (files readable only by the agent's
    # user, the storage key by its group), "tpm" (sealed by a TPM 2.0, tpm_tcti names it).
    key_protection: str = "file"
    tpm_tcti: str = ""
    limits: Limits = field(default_factory=Limits)

    def monitor_overrides(self) -> dict[str, float]:
        """The device's monitoring thresholds that replace the bundle's (the non-zero ones)."""
        fields = {
            "drift_psi": self.monitor_drift_psi,
            "feature_psi": self.monitor_feature_psi,
            "anomaly_rate": self.monitor_anomaly_rate,
            "confidence_drop": self.monitor_confidence_drop,
            "output_psi": self.monitor_output_psi,
            "window": float(self.monitor_window),
        }
        return {k: float(v) for k, v in fields.items() if v}

    @property
    def config_path(self) -> Path:
        """Where this configuration lives."""
        return self.data_dir / CONFIG_NAME


def _toml_char(char: str) -> str:
    # A TOML basic string holds no raw control characters (a raw newline ends it).
    if char in ('"', "\\"):
        return "\\" + char
    if char < " " or char == "\x7f":
        return f"\\u{ord(char):04x}"
    return char


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + "".join(_toml_char(c) for c in value) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dumps(config: AgentConfig) -> str:
    """Render the configuration as TOML (the stdlib reads TOML but does not write it)."""
    lines = ["# edgepack-agent configuration, written by `edgepack-agent enroll`."]
    for f in dataclasses.fields(config):
        if f.name in ("data_dir", "limits"):
            continue
        lines.append(f"{f.name} = {_toml_value(getattr(config, f.name))}")
    lines.append("")
    lines.append("[limits]")
    for f in dataclasses.fields(config.limits):
        lines.append(f"{f.name} = {_toml_value(getattr(config.limits, f.name))}")
    return "\n".join(lines) + "\n"


def save(config: AgentConfig) -> None:
    """Write the configuration atomically."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    _atomic.write_bytes(config.config_path, dumps(config).encode(), mode=0o600)


def load(data_dir: Path) -> AgentConfig:
    """Read ``DATA/config.toml``; unknown keys are an error so typos do not pass silently."""
    path = data_dir / CONFIG_NAME
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise NotEnrolledError(
            f"{data_dir} holds no enrolment ({CONFIG_NAME} missing)",
            hint="run `edgepack-agent enroll` first or pass the right --data-dir",
        ) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise InvalidInputError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidInputError(f"{path} is not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:  # TOMLDecodeError, huge integers, deep nesting
        raise InvalidInputError(f"{path} is not valid TOML: {exc}") from None
    limits_raw = raw.pop("limits", {})
    if not isinstance(limits_raw, dict):
        raise InvalidInputError(f"{path}: [limits] must be a table")
    try:
        limits = Limits(**_checked(Limits, limits_raw, path, "limits."))
        config = AgentConfig(
            data_dir=data_dir, limits=limits, **_checked(AgentConfig, raw, path, "")
        )
    except TypeError as exc:
        raise InvalidInputError(f"{path}: {exc}", hint="remove or fix the unknown key") from None
    if config.at_rest not in AT_REST_MODES:
        raise InvalidInputError(
            f"{path}: at_rest must be one of {', '.join(AT_REST_MODES)}, not {config.at_rest!r}"
        )
    if config.key_protection not in KEY_PROTECTIONS:
        raise InvalidInputError(
            f"{path}: key_protection must be one of {', '.join(KEY_PROTECTIONS)}, "
            f"not {config.key_protection!r}"
        )
    try:
        check_names(config.models, config.channel, config.cohort)
    except InvalidInputError as exc:
        raise InvalidInputError(
            f"{path}: {exc}", hint="enrol again with valid --model, --channel and --cohort"
        ) from None
    return config


def check_names(models: list[str], channel: str, cohort: str) -> None:
    """Refuse a model, channel or cohort name that could not name a folder of its own."""
    for name in models:
        names.model(name)
    names.channel(channel)
    names.cohort(cohort)


def _checked(cls: type[Any], raw: dict[str, Any], path: Path, prefix: str) -> dict[str, Any]:
    """``raw`` with each known field checked against its declared type.

    Strings stay strings and ``models`` a list of them; limits are non-negative
    finite numbers (an ``int`` field takes integers only). Unknown keys are left
    for the dataclass to refuse.
    """
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}  # annotations, as text
    checked: dict[str, Any] = {}
    for key, value in raw.items():
        kind = types.get(key)
        where = f"{path}: {prefix}{key}"
        if kind == "list[str]":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise InvalidInputError(f"{where} must be a list of strings")
        elif kind in ("int", "float"):
            wanted = int if kind == "int" else (int, float)
            if isinstance(value, bool) or not isinstance(value, wanted):
                raise InvalidInputError(
                    f"{where} must be {'an integer' if kind == 'int' else 'a number'}"
                )
            if not math.isfinite(value) or value < 0:
                raise InvalidInputError(f"{where} must be a finite number, zero or more")
            if kind == "float":
                value = float(value)
        elif kind == "str" and not isinstance(value, str):
            raise InvalidInputError(f"{where} must be a string")
        elif kind == "bool" and not isinstance(value, bool):
            raise InvalidInputError(f"{where} must be true or false")
        checked[key] = value
    return checked


def confine_temp(data_dir: Path) -> Path:
    """Point this process's temporary and cache files at ``DATA/tmp`` and ``DATA/cache``.

    Measured: importing onnxruntime writes ``$TMPDIR/.ses`` and
    ``$XDG_CACHE_HOME/Microsoft/DeveloperTools/.onnxruntime/{deviceid,onnxruntime.db}``
    (``~/.cache`` without XDG_CACHE_HOME). Pointing both inside DATA keeps the
    agent from writing anywhere else. Call before onnxruntime is imported.
    """
    tmp = data_dir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    cache = data_dir / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(tmp)
    os.environ["XDG_CACHE_HOME"] = str(cache)
    tempfile.tempdir = None  # re-read TMPDIR on next use
    return tmp


def resolve_data_dir(value: Path | None) -> Path:
    """``--data-dir``, else ``EDGEPACK_DATA_DIR``, else ``/var/lib/edgepack``."""
    if value is not None:
        return value.absolute()
    env = os.environ.get("EDGEPACK_DATA_DIR")
    return Path(env).absolute() if env else DEFAULT_DATA_DIR
