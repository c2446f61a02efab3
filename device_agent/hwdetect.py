"""Hardware detection: which profile fits this machine, and can it run a given bundle.

The decision is a pure function, :func:`detect`, over :class:`MachineFacts` —
the architecture, ``/proc/cpuinfo``, the device-tree model, the DMI product name
and the memory size. Only :func:`read_machine_facts` touches the file system,
and it reads from a root directory the caller chooses, so tests run the same
code on the files captured from each kind of board.

A profile fits when the board model contains one of its ``board_models``
substrings (profiles without any match on CPU features alone) and the CPU has
every one of its ``required_features`` (``"a|b"`` accepts either). Among the
fitting profiles one matched by board wins over one matched by features; when
nothing fits, the machine gets ``generic-<arch>``. Every rejected candidate is
reported with its reason, so ``edgepack-agent detect`` explains its choice.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.errors import InvalidInputError
from edgepack.hw import ARCHITECTURES, HardwareProfile, list_profiles

__all__ = [
    "CpuInfo",
    "Detection",
    "HardwareMismatchError",
    "MachineFacts",
    "check_bundle_compatible",
    "choose_profile",
    "detect",
    "normalize_architecture",
    "parse_cpuinfo",
    "read_machine_facts",
]

AUTO = "auto"
# Names the kernel, Python or package managers use for the same instruction sets.
_ARCH_ALIASES = {
    "aarch64": "aarch64",
    "arm64": "aarch64",
    "armv8l": "aarch64",
    "aarch64_be": "aarch64_be",
    "x86_64": "x86_64",
    "amd64": "x86_64",
    "x64": "x86_64",
    "x86-64": "x86_64",
}
# ARM's "CPU part" numbers (implementer 0x41), to name the cores in reports.
_ARM_PARTS = {
    "0xd03": "Cortex-A53",
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1",
    "0xd0d": "Cortex-A77",
    "0xd40": "Neoverse-V1",
    "0xd41": "Cortex-A78",
    "0xd42": "Cortex-A78AE",
    "0xd44": "Cortex-X1",
    "0xd46": "Cortex-A510",
    "0xd47": "Cortex-A710",
    "0xd49": "Neoverse-N2",
    "0xd4f": "Neoverse-V2",
}
# Bounds on what is read from the (possibly fake) root: cpuinfo of a 256-core
# server is about 300 KiB; the other files are one line.
_MAX_CPUINFO = 4 * 1024 * 1024
_MAX_SMALL = 64 * 1024
_MAX_MEMTOTAL_DIGITS = 20  # kB; 2**64 bytes has 20 digits


class HardwareMismatchError(InvalidInputError):
    """A bundle or a requested profile does not suit this machine."""


@dataclass(frozen=True)
class CpuInfo:
    """What ``/proc/cpuinfo`` says, in either the x86 or the ARM layout."""

    processors: int
    features: frozenset[str]
    model_name: str | None
    cores: tuple[str, ...]
    board_model: str | None


@dataclass(frozen=True)
class MachineFacts:
    """The raw inputs to detection, as read from a machine (or a fixture of one)."""

    machine: str
    cpuinfo: str
    device_tree_model: str | None = None
    dmi_product_name: str | None = None
    memtotal_kb: int | None = None

    @property
    def architecture(self) -> str:
        """The machine's architecture under its canonical name (``aarch64``, ``x86_64``)."""
        return normalize_architecture(self.machine)

    @property
    def cpu(self) -> CpuInfo:
        """The parsed ``/proc/cpuinfo``."""
        return parse_cpuinfo(self.cpuinfo)

    @property
    def memory_mb(self) -> int | None:
        """Total memory in MiB, when known."""
        return None if self.memtotal_kb is None else self.memtotal_kb // 1024

    def board_models(self) -> list[str]:
        """Every board name the machine exposes, most authoritative first."""
        names = [self.device_tree_model, self.dmi_product_name, self.cpu.board_model]
        unique: list[str] = []
        for name in names:
            if name and name not in unique:
                unique.append(name)
        return unique


@dataclass(frozen=True)
class Detection:
    """The chosen profile for a machine and why it was chosen."""

    facts: MachineFacts
    profile: HardwareProfile
    matched_by: str
    reasons: tuple[str, ...] = field(default_factory=tuple)

    @property
    def architecture(self) -> str:
        """The machine's canonical architecture."""
        return self.facts.architecture

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary: facts, the chosen profile and the reasons."""
        cpu = self.facts.cpu
        return {
            "machine": self.facts.machine,
            "architecture": self.architecture,
            "cpu": {
                "processors": cpu.processors,
                "model_name": cpu.model_name,
                "cores": list(cpu.cores),
                "features": sorted(cpu.features),
            },
            "device_tree_model": self.facts.device_tree_model,
            "dmi_product_name": self.facts.dmi_product_name,
            "memory_mb": self.facts.memory_mb,
            "profile": self.profile.name,
            "matched_by": self.matched_by,
            "reasons": list(self.reasons),
        }


def normalize_architecture(machine: str) -> str:
    """``arm64`` → ``aarch64``, ``amd64`` → ``x86_64``; unknown names pass through lower-cased."""
    key = machine.strip().lower()
    return _ARCH_ALIASES.get(key, key)


def parse_cpuinfo(text: str) -> CpuInfo:
    """Parse ``/proc/cpuinfo`` from x86 (``flags``) or ARM (``Features``) kernels.

    Features are those every processor has (the intersection), because a model's
    kernels may run on any core.
    """
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    trailer: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
                current = {}
            continue
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "processor" and current.get("processor") is not None:
            blocks.append(current)
            current = {}
        current[key] = value
    if current:
        blocks.append(current)
    processors = [block for block in blocks if "processor" in block]
    # ARM kernels print machine-wide lines (Hardware, Revision, Model) after the CPUs.
    for block in blocks:
        if "processor" not in block:
            trailer.update(block)

    feature_sets = [
        frozenset((block.get("flags") or block.get("features") or "").split())
        for block in processors
        if block.get("flags") is not None or block.get("features") is not None
    ]
    features = frozenset.intersection(*feature_sets) if feature_sets else frozenset()
    model_name = next((b["model name"] for b in processors if b.get("model name")), None)
    cores: list[str] = []
    for block in processors:
        part = block.get("cpu part", "").lower()
        if part:
            name = _ARM_PARTS.get(part, f"ARM part {part}")
            if block.get("cpu implementer", "0x41").lower() != "0x41":
                name = f"part {part} (implementer {block.get('cpu implementer')})"
            if name not in cores:
                cores.append(name)
    if not cores and model_name:
        cores.append(model_name)
    return CpuInfo(
        processors=len(processors),
        features=features,
        model_name=model_name,
        cores=tuple(cores),
        board_model=trailer.get("model") or None,
    )


def read_machine_facts(root: Path = Path("/")) -> MachineFacts:
    """Read the facts detection needs from the file system under ``root``.

    On the real root the architecture is ``platform.machine()`` — what this
    Python runs as, which decides which wheels work (under qemu user-mode it is
    the guest's). Under another root (a captured fixture) it is that root's
    ``proc/sys/kernel/arch``, the kernel's own answer.
    """
    root = Path(root)
    if root.resolve() == Path("/"):
        machine = platform.machine()
    else:
        arch_text = _read_text(root / "proc/sys/kernel/arch", _MAX_SMALL)
        if not arch_text or not arch_text.strip():
            raise InvalidInputError(
                f"{root} has no proc/sys/kernel/arch",
                hint="a captured machine root must hold the output of `uname -m` there",
            )
        machine = arch_text.strip()
    cpuinfo = _read_text(root / "proc/cpuinfo", _MAX_CPUINFO) or ""
    model = _read_text(root / "proc/device-tree/model", _MAX_SMALL)
    if model is None:
        model = _read_text(root / "sys/firmware/devicetree/base/model", _MAX_SMALL)
    return MachineFacts(
        machine=machine,
        cpuinfo=cpuinfo,
        device_tree_model=_clean(model),
        dmi_product_name=_clean(_read_text(root / "sys/class/dmi/id/product_name", _MAX_SMALL)),
        memtotal_kb=_memtotal_kb(_read_text(root / "proc/meminfo", _MAX_SMALL) or ""),
    )


def detect(facts: MachineFacts, profiles: Iterable[HardwareProfile]) -> Detection:
    """Choose the profile that fits ``facts`` best; fall back to ``generic-<arch>``."""
    arch = facts.architecture
    if arch not in ARCHITECTURES:
        raise HardwareMismatchError(
            f"unsupported architecture {facts.machine!r}",
            hint="edgepack runs on " + " and ".join(ARCHITECTURES),
        )
    features = facts.cpu.features
    boards = facts.board_models()
    reasons: list[str] = []
    fitting: list[tuple[tuple[int, int, int], HardwareProfile, str]] = []
    generic: HardwareProfile | None = None
    for profile in sorted(profiles, key=lambda p: p.name):
        if profile.architecture != arch:
            continue
        if profile.is_generic:
            generic = profile
            continue
        board_hit = _board_match(profile, boards)
        if profile.board_models and board_hit is None:
            reasons.append(
                f"{profile.name}: board {_quote(boards)} is none of {_quote(profile.board_models)}"
            )
            continue
        missing = _missing(profile.required_features, features)
        if missing:
            reasons.append(f"{profile.name}: CPU lacks {', '.join(missing)}")
            continue
        how = f"board {board_hit!r}" if board_hit else "CPU features"
        score = (1 if board_hit else 0, len(board_hit or ""), len(profile.required_features))
        fitting.append((score, profile, how))
    if fitting:
        fitting.sort(key=lambda item: item[0], reverse=True)
        score, profile, how = fitting[0]
        others = [p.name for s, p, _ in fitting[1:] if s == score]
        if others:
            reasons.append(f"also fitting equally: {', '.join(others)} (chose by name)")
        reasons.insert(0, f"{profile.name}: matched by {how} and CPU features")
        return Detection(facts, profile, how, tuple(reasons))
    if generic is None:
        raise HardwareMismatchError(
            f"no hardware profile fits this {arch} machine and there is no generic-{arch} profile",
            hint=f"add hw/profiles/generic-{arch}.toml",
        )
    missing = _missing(generic.required_features, features)
    if missing:
        raise HardwareMismatchError(
            f"this {arch} machine lacks CPU features {', '.join(missing)} that even "
            f"{generic.name} requires",
            hint="check /proc/cpuinfo; edgepack's builds need them",
        )
    reasons.insert(0, f"{generic.name}: no board profile fits, using the {arch} fallback")
    return Detection(facts, generic, "fallback", tuple(reasons))


def choose_profile(
    requested: str = AUTO,
    *,
    facts: MachineFacts | None = None,
    profiles: Sequence[HardwareProfile] | None = None,
) -> Detection:
    """Resolve ``--profile``: ``auto`` detects; a name is checked against the machine.

    A named profile must be of the machine's architecture and its required CPU
    features must be present; its board models are not enforced (the operator
    may know better, e.g. a board whose firmware hides its model).
    """
    facts = facts if facts is not None else read_machine_facts()
    profiles = list(profiles) if profiles is not None else list_profiles()
    if requested == AUTO:
        return detect(facts, profiles)
    by_name = {p.name: p for p in profiles}
    profile = by_name.get(requested)
    if profile is None:
        raise InvalidInputError(
            f"unknown hardware profile {requested!r}",
            hint=f"use 'auto' or one of: {', '.join(sorted(by_name))}",
        )
    if profile.architecture != facts.architecture:
        raise HardwareMismatchError(
            f"profile {profile.name!r} is for {profile.architecture}, "
            f"this machine is {facts.architecture}",
            hint="use --profile auto or a profile of this architecture",
        )
    missing = _missing(profile.required_features, facts.cpu.features)
    if missing:
        raise HardwareMismatchError(
            f"profile {profile.name!r} needs CPU features {', '.join(missing)}, "
            "which this machine lacks",
            hint=f"use --profile auto or generic-{facts.architecture}",
        )
    return Detection(facts, profile, "requested", (f"{profile.name}: requested by name",))


def check_bundle_compatible(
    profile_name_of_bundle: str | None,
    architectures_of_bundle: Sequence[str],
    detection: Detection,
) -> None:
    """Refuse a bundle built for other hardware than ``detection`` found.

    A bundle suits the device when its architectures include the device's (or
    are empty or ``any``) and its profile is the device's profile, the
    generic profile of the device's architecture, or absent/``any``.
    """
    arch = detection.architecture
    device = f"this device is {detection.profile.name} ({_describe(detection.facts)})"
    arches = {normalize_architecture(a) for a in architectures_of_bundle}
    if arches and "any" not in arches and arch not in arches:
        raise HardwareMismatchError(
            f"bundle is for {', '.join(sorted(arches))} but {device}",
            hint=f"publish or select the {arch} variant of this release",
        )
    if profile_name_of_bundle in (None, "", "any"):
        return
    if profile_name_of_bundle in (detection.profile.name, f"generic-{arch}"):
        return
    raise HardwareMismatchError(
        f"bundle is for hardware profile {profile_name_of_bundle!r} but {device}",
        hint=f"install the {detection.profile.name} variant (or generic-{arch}) of this release",
    )


def _describe(facts: MachineFacts) -> str:
    boards = facts.board_models()
    return f"{boards[0]}, {facts.architecture}" if boards else facts.architecture


def _board_match(profile: HardwareProfile, boards: Sequence[str]) -> str | None:
    for wanted in sorted(profile.board_models, key=len, reverse=True):
        for board in boards:
            if wanted.casefold() in board.casefold():
                return wanted
    return None


def _missing(required: Iterable[str], features: frozenset[str]) -> list[str]:
    return [req for req in required if not any(alt in features for alt in req.split("|"))]


def _quote(names: Sequence[str]) -> str:
    return " / ".join(repr(n) for n in names) if names else "(unknown)"


def _clean(text: str | None) -> str | None:
    if text is None:
        return None
    cleaned = text.replace("\x00", "").strip()
    return cleaned or None


def _memtotal_kb(meminfo: str) -> int | None:
    for line in meminfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "MemTotal":
            number = value.split()[0] if value.split() else ""
            # isdigit() alone admits digits int() refuses ("²") and numbers past its digit limit.
            ok = number.isascii() and number.isdigit() and len(number) <= _MAX_MEMTOTAL_DIGITS
            return int(number) if ok else None
    return None


def _read_text(path: Path, limit: int) -> str | None:
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit)
    except OSError:
        return None
    return data.decode("utf-8", errors="replace")
