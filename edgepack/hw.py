"""Hardware profiles: what a class of device is, and how to build and check models for it.

A profile (``hw/profiles/NAME.toml``, schema in docs/architecture.md) names an
architecture, the CPU features builds may rely on, the onnxruntime execution
providers, the default quantisation recipe that suits the CPU, the health-check
budgets, and the facts (board model substrings, required CPU features) the
agent's detection matches against. The builder, the repository and the device
agent all read profiles through this module, so validation is strict: a typo in
a profile must fail loudly at load time, not produce a silently wrong build.

This module imports only the standard library and :mod:`edgepack.errors`
because the device agent imports it.
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.errors import InvalidInputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "ARCHITECTURES",
    "QUANTIZATION_RECIPES",
    "HardwareProfile",
    "HealthBudgets",
    "QuantizationDefaults",
    "list_profiles",
    "load_profile",
    "load_profile_file",
    "profile_names",
    "profiles_dir",
]

ARCHITECTURES = ("aarch64", "x86_64")
QUANTIZATION_RECIPES = ("none", "fp16", "dynamic", "static", "auto")
QUANTIZED_TYPES = ("int8", "uint8")
ENV_DIR = "EDGEPACK_HW_DIR"

# Profile names become file names and bundle-name parts: keep them plain.
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# CPU feature names as Linux prints them in /proc/cpuinfo; "a|b" means either.
_FEATURE_RE = re.compile(r"^[a-z0-9_]+(\|[a-z0-9_]+)*$")
_MAX_PROFILE_BYTES = 64 * 1024

_TOP_KEYS = {
    "name",
    "description",
    "architecture",
    "cpu_features",
    "memory_mb",
    "execution_providers",
    "match",
    "quantization",
    "health",
}
_MATCH_KEYS = {"board_models", "required_features"}
_QUANT_KEYS = {
    "recipe",
    "weight_type",
    "activation_type",
    "per_channel",
    "reduce_range",
    "min_cosine",
}
_HEALTH_KEYS = {"latency_ms", "memory_mb"}


@dataclass(frozen=True)
class QuantizationDefaults:
    """The builder's default quantisation recipe and parameters for a profile's CPU."""

    recipe: str
    weight_type: str
    activation_type: str
    per_channel: bool
    reduce_range: bool
    min_cosine: float


@dataclass(frozen=True)
class HealthBudgets:
    """Upper bounds a model must stay within on the device's health check."""

    latency_ms: float
    memory_mb: float


@dataclass(frozen=True)
class HardwareProfile:
    """One class of device, as loaded and validated from its TOML file."""

    name: str
    description: str
    architecture: str
    cpu_features: tuple[str, ...]
    memory_mb: int
    execution_providers: tuple[str, ...]
    board_models: tuple[str, ...]
    required_features: tuple[str, ...]
    quantization: QuantizationDefaults
    health: HealthBudgets

    @property
    def is_generic(self) -> bool:
        """True for the fallback profile of an architecture (``generic-<arch>``)."""
        return self.name == f"generic-{self.architecture}"

    def to_dict(self) -> dict[str, Any]:
        """The profile as plain JSON-able data, in the TOML file's shape."""
        return {
            "name": self.name,
            "description": self.description,
            "architecture": self.architecture,
            "cpu_features": list(self.cpu_features),
            "memory_mb": self.memory_mb,
            "execution_providers": list(self.execution_providers),
            "match": {
                "board_models": list(self.board_models),
                "required_features": list(self.required_features),
            },
            "quantization": {
                "recipe": self.quantization.recipe,
                "weight_type": self.quantization.weight_type,
                "activation_type": self.quantization.activation_type,
                "per_channel": self.quantization.per_channel,
                "reduce_range": self.quantization.reduce_range,
                "min_cosine": self.quantization.min_cosine,
            },
            "health": {
                "latency_ms": self.health.latency_ms,
                "memory_mb": self.health.memory_mb,
            },
        }


def profiles_dir() -> Path:
    """The directory holding the profile files.

    Looked up in order: ``$EDGEPACK_HW_DIR``; the copy packaged in the wheel
    (``edgepack/hw_profiles/``); the source checkout's ``hw/profiles/``.
    """
    env = os.environ.get(ENV_DIR)
    if env:
        path = Path(env)
        if not path.is_dir():
            raise InvalidInputError(
                f"{ENV_DIR}={env} is not a directory",
                hint="point it at a folder of hardware profile .toml files or unset it",
            )
        return path
    here = Path(__file__).resolve().parent
    for candidate in (here / "hw_profiles", here.parent / "hw" / "profiles"):
        if candidate.is_dir():
            return candidate
    raise InvalidInputError(
        "no hardware profiles directory found (neither edgepack/hw_profiles nor hw/profiles)",
        hint=f"reinstall edgepack or set {ENV_DIR} to a folder of profile .toml files",
    )


def list_profiles() -> list[HardwareProfile]:
    """Every profile in :func:`profiles_dir`, sorted by name; any invalid one is an error."""
    directory = profiles_dir()
    return [load_profile_file(path) for path in sorted(directory.glob("*.toml"))]


def profile_names() -> list[str]:
    """The names of the available profiles (file stems), without loading them."""
    return sorted(path.stem for path in profiles_dir().glob("*.toml"))


def load_profile(name: str) -> HardwareProfile:
    """Load the profile called ``name`` from :func:`profiles_dir`."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidInputError(
            f"invalid hardware profile name {name!r}",
            hint="use lower-case letters, digits, '.', '_' or '-' (see `edgepack hw list`)",
        )
    path = profiles_dir() / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(profile_names()) or "none"
        raise InvalidInputError(
            f"unknown hardware profile {name!r}",
            hint=f"known profiles: {known}",
        )
    return load_profile_file(path)


def load_profile_file(path: Path | str) -> HardwareProfile:
    """Load and validate one profile file; its ``name`` must equal its file stem."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(_MAX_PROFILE_BYTES + 1)
    except OSError as exc:
        raise InvalidInputError(
            f"cannot read hardware profile {path}: {exc.strerror or exc}"
        ) from exc
    if len(raw) > _MAX_PROFILE_BYTES:
        raise InvalidInputError(
            f"hardware profile {path} is larger than {_MAX_PROFILE_BYTES} bytes"
        )
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError: TOMLDecodeError, and integers over Python's digit limit;
        # RecursionError: arrays or inline tables nested past the interpreter's stack.
        raise InvalidInputError(f"hardware profile {path} is not valid TOML: {exc}") from exc
    profile = _parse(data, str(path))
    if profile.name != path.stem:
        raise InvalidInputError(
            f"hardware profile {path}: name {profile.name!r} differs from the file name",
            hint=f"rename the file to {profile.name}.toml or set name = {path.stem!r}",
        )
    return profile


def _parse(data: dict[str, Any], where: str) -> HardwareProfile:
    _check_keys(data, _TOP_KEYS, where, "")
    name = _string(data, "name", where)
    if not _NAME_RE.fullmatch(name):
        raise InvalidInputError(
            f"hardware profile {where}: invalid name {name!r}",
            hint="use lower-case letters, digits, '.', '_' or '-'",
        )
    architecture = _choice(data, "architecture", ARCHITECTURES, where)
    match = _table(data, "match", where)
    _check_keys(match, _MATCH_KEYS, where, "match.")
    quant = _table(data, "quantization", where)
    _check_keys(quant, _QUANT_KEYS, where, "quantization.")
    health = _table(data, "health", where)
    _check_keys(health, _HEALTH_KEYS, where, "health.")

    providers = _strings(data, "execution_providers", where, pattern=None)
    if not providers:
        raise InvalidInputError(f"hardware profile {where}: execution_providers is empty")
    for provider in providers:
        if not provider.endswith("ExecutionProvider"):
            raise InvalidInputError(
                f"hardware profile {where}: {provider!r} is not an onnxruntime execution "
                "provider name",
                hint="use names like 'CPUExecutionProvider'",
            )
    if "CPUExecutionProvider" not in providers:
        raise InvalidInputError(
            f"hardware profile {where}: execution_providers lacks 'CPUExecutionProvider'",
            hint="onnxruntime falls back to the CPU provider; list it so builds validate on it",
        )

    board_models = _strings(match, "board_models", where, pattern=None, prefix="match.")
    if any(not model.strip() for model in board_models):
        raise InvalidInputError(f"hardware profile {where}: match.board_models has an empty entry")
    profile = HardwareProfile(
        name=name,
        description=_string(data, "description", where),
        architecture=architecture,
        cpu_features=tuple(_strings(data, "cpu_features", where, pattern=_FEATURE_RE)),
        memory_mb=_positive_int(data, "memory_mb", where),
        execution_providers=tuple(providers),
        board_models=tuple(board_models),
        required_features=tuple(
            _strings(match, "required_features", where, pattern=_FEATURE_RE, prefix="match.")
        ),
        quantization=QuantizationDefaults(
            recipe=_choice(quant, "recipe", QUANTIZATION_RECIPES, where, "quantization."),
            weight_type=_choice(quant, "weight_type", QUANTIZED_TYPES, where, "quantization."),
            activation_type=_choice(
                quant, "activation_type", QUANTIZED_TYPES, where, "quantization."
            ),
            per_channel=_bool(quant, "per_channel", where, "quantization."),
            reduce_range=_bool(quant, "reduce_range", where, "quantization."),
            min_cosine=_number(quant, "min_cosine", where, "quantization.", upper=1.0),
        ),
        health=HealthBudgets(
            latency_ms=_number(health, "latency_ms", where, "health."),
            memory_mb=_number(health, "memory_mb", where, "health."),
        ),
    )
    if profile.is_generic and profile.board_models:
        raise InvalidInputError(
            f"hardware profile {where}: generic profile {name!r} must have empty "
            "match.board_models",
            hint="a generic profile is the fallback for its whole architecture",
        )
    return profile


def _check_keys(table: dict[str, Any], allowed: set[str], where: str, prefix: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise InvalidInputError(
            f"hardware profile {where}: unknown key(s) "
            + ", ".join(prefix + key for key in unknown),
            hint="allowed: " + ", ".join(prefix + key for key in sorted(allowed)),
        )
    missing = sorted(allowed - set(table))
    if missing:
        raise InvalidInputError(
            f"hardware profile {where}: missing key(s) "
            + ", ".join(prefix + key for key in missing)
        )


def _type_error(where: str, key: str, wanted: str, value: object) -> InvalidInputError:
    return InvalidInputError(
        f"hardware profile {where}: {key} must be {wanted}, not {type(value).__name__} {value!r}"
    )


def _table(data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data[key]
    if not isinstance(value, dict):
        raise _type_error(where, f"[{key}]", "a table", value)
    return value


def _string(data: dict[str, Any], key: str, where: str, prefix: str = "") -> str:
    value = data[key]
    if not isinstance(value, str) or not value.strip():
        raise _type_error(where, prefix + key, "a non-empty string", value)
    return value


def _choice(
    data: dict[str, Any], key: str, choices: tuple[str, ...], where: str, prefix: str = ""
) -> str:
    value = _string(data, key, where, prefix)
    if value not in choices:
        raise InvalidInputError(
            f"hardware profile {where}: unknown {prefix}{key} {value!r}",
            hint="use one of: " + ", ".join(choices),
        )
    return value


def _strings(
    data: dict[str, Any],
    key: str,
    where: str,
    *,
    pattern: re.Pattern[str] | None,
    prefix: str = "",
) -> list[str]:
    value = data[key]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _type_error(where, prefix + key, "a list of strings", value)
    if len(set(value)) != len(value):
        raise InvalidInputError(f"hardware profile {where}: {prefix}{key} has duplicates")
    if pattern is not None:
        for item in value:
            if not pattern.fullmatch(item):
                raise InvalidInputError(
                    f"hardware profile {where}: {prefix}{key} entry {item!r} is not a CPU "
                    "feature name",
                    hint="use lower-case names as /proc/cpuinfo prints them, "
                    "'a|b' for either of two",
                )
    return list(value)


def _bool(data: dict[str, Any], key: str, where: str, prefix: str) -> bool:
    value = data[key]
    if not isinstance(value, bool):
        raise _type_error(where, prefix + key, "true or false", value)
    return value


def _positive_int(data: dict[str, Any], key: str, where: str) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _type_error(where, key, "a positive integer", value)
    return value


def _number(
    data: dict[str, Any], key: str, where: str, prefix: str, upper: float | None = None
) -> float:
    value = data[key]
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise _type_error(where, prefix + key, "a positive finite number", value)
    if upper is not None and value > upper:
        raise InvalidInputError(
            f"hardware profile {where}: {prefix}{key} must be at most {upper}, not {value!r}"
        )
    return float(value)
