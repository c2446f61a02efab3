"""Which release this device should run: a thin layer over ``edgepack.channel``.

It adds what only the device knows: its identity, architecture, hardware
profile (auto-detected when configured as ``auto``) and cohort, and the
defence in depth of refusing a channel document older than one already seen.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

from device_agent import hwdetect
from device_agent.config import AgentConfig
from edgepack.channel import (
    ANY,
    REASON_NO_VARIANT,
    ChannelDocument,
    Selection,
    parse_channel,
    select_release,
)
from edgepack.errors import InvalidInputError

_ARCH_ALIASES = {"arm64": "aarch64", "aarch64": "aarch64", "x86_64": "x86_64", "amd64": "x86_64"}


def machine_architecture() -> str:
    """This machine's architecture in edgepack's spelling (``aarch64`` or ``x86_64``)."""
    machine = platform.machine().lower()
    return _ARCH_ALIASES.get(machine, machine)


def detect_profile() -> str | None:
    """The hardware profile matching this machine (best effort; ``None`` when unknown)."""
    try:
        return hwdetect.choose_profile(hwdetect.AUTO).profile.name
    except Exception:  # detection is best effort; the 'any' variant still applies
        return None


@dataclass(frozen=True)
class Device:
    """The facts selection needs about this device."""

    device_id: str
    architecture: str
    profile: str | None
    cohort: str | None

    @classmethod
    def from_config(cls, config: AgentConfig) -> Device:
        """Resolve ``auto`` values of the configuration on this machine.

        A profile named at enrolment is the operator's word on the device class
        (e.g. a board whose firmware hides its model, or an emulated device):
        its architecture is used unless the configuration names one.
        """
        profile: str | None = config.profile
        if profile in ("", "auto"):
            profile = detect_profile()
            arch = config.architecture or machine_architecture()
        else:
            arch = config.architecture or _profile_architecture(profile) or machine_architecture()
        return cls(config.device_id, arch, profile, config.cohort or None)


def _profile_architecture(name: str | None) -> str | None:
    if not name:
        return None
    try:
        from edgepack.hw import load_profile

        return load_profile(name).architecture
    except Exception:  # an unknown profile name: fall back to the machine's architecture
        return None


def parse_for(data: bytes, model: str, channel: str, seen_sequence: int) -> ChannelDocument:
    """Parse a channel document and check it is the one asked for and not older than seen."""
    doc = parse_channel(data)
    if doc.model != model or doc.channel != channel:
        raise InvalidInputError(
            f"channel document for {doc.model}/{doc.channel} served as {model}/{channel}",
            hint="the repository's operators role signed a misplaced document",
        )
    if doc.sequence < seen_sequence:
        raise InvalidInputError(
            f"channel document {model}/{channel} has sequence {doc.sequence}, older than "
            f"{seen_sequence} already seen; ignoring it",
        )
    return doc


def select(doc: ChannelDocument, device: Device) -> Selection:
    """The release and bundle variant for this device."""
    return select_release(
        doc,
        device_id=device.device_id,
        profile=device.profile,
        architecture=device.architecture,
        cohort=device.cohort,
    )


def why_no_bundle(model: str, chosen: Selection, device: Device) -> str | None:
    """Why ``chosen`` gives this device nothing to run, in words an operator can act on.

    For a release with no variant for the device it names the profiles (and
    their architectures) the release was published for and what to do: enrol
    the device with one of them, or publish a variant for its profile.
    Otherwise the selection's own reason.
    """
    release = chosen.release
    if chosen.reason != REASON_NO_VARIANT or release is None:
        return chosen.reason
    wanted = (
        f"profile {device.profile} on {device.architecture}"
        if device.profile
        else f"{device.architecture} (no profile detected)"
    )
    variants = dict(release.variants)
    published = ", ".join(f"{key} on {v.architecture}" for key, v in sorted(variants.items()))
    fitting = sorted(
        key for key, v in variants.items() if v.architecture in (device.architecture, ANY)
    )
    target = device.profile or f"generic-{device.architecture}"
    todo = f"publish a variant for {target}"
    if fitting:
        todo = f"enrol with --profile {fitting[0]} if this device is one, or {todo}"
    return (
        f"no variant of {model} {release.version} for {wanted} "
        f"(published: {published or 'none'}); {todo}"
    )


def profile_fits(bundle_profile: str | None, device: Device) -> bool:
    """Whether a bundle built for ``bundle_profile`` may run on ``device``.

    A bundle for no profile (``any``) or for the generic profile of the device's
    architecture runs anywhere on it; a bundle for a named board only on that
    board. The channel's variant key is the operator's word, the bundle's own
    signed profile is the producer's: both must agree, so a mis-pointed variant
    (an intel-nuc build, with its VNNI-only weights, under generic-x86_64) is refused.
    """
    if bundle_profile in (None, "", "any", f"generic-{device.architecture}"):
        return True
    return bundle_profile == device.profile
