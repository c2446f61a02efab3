"""Fuzz target: hardware profiles and the machine facts detection reads.

Two entry points, chosen by the first byte of the input:

* even: :func:`edgepack.hw.load_profile_file` on a file holding the rest of
  the input (a profile TOML: ``hw/profiles/*.toml`` or ``$EDGEPACK_HW_DIR``);
* odd: the rest is split on :data:`~tests.fuzz._common.MACHINE_SEPARATOR` into the files of a captured
  machine root (``proc/sys/kernel/arch``, ``proc/cpuinfo``,
  ``proc/device-tree/model``, ``sys/class/dmi/id/product_name``,
  ``proc/meminfo``), then :func:`device_agent.hwdetect.read_machine_facts`,
  :func:`~device_agent.hwdetect.choose_profile` (auto and by every name),
  ``Detection.to_dict`` and :func:`~device_agent.hwdetect.check_bundle_compatible`.

Accepted outcomes: success, or :class:`~edgepack.errors.InvalidInputError`
(:class:`~device_agent.hwdetect.HardwareMismatchError` is one). Anything else is
a finding.
"""

from __future__ import annotations

from contextlib import nullcontext

import atheris  # type: ignore[import-untyped]  # ships no type hints

from tests.fuzz._common import (
    INSTRUMENTED,
    MACHINE_FILES,
    MACHINE_SEPARATOR,
    run_fuzzer,
    scratch_dir,
)

# Instrument only when fuzzing: a test importing this module runs the code plain.
with atheris.instrument_imports(include=INSTRUMENTED) if __name__ == "__main__" else nullcontext():
    from device_agent import hwdetect
    from edgepack import hw
    from edgepack.errors import InvalidInputError

EXPECTED: tuple[type[Exception], ...] = (InvalidInputError,)
_DIR = scratch_dir()
_PROFILE = _DIR / "fuzz.toml"
_ROOT = _DIR / "root"
_PROFILES = hw.list_profiles()
for _name in MACHINE_FILES:
    (_ROOT / _name).parent.mkdir(parents=True, exist_ok=True)


def _machine(data: bytes) -> None:
    parts = data.split(MACHINE_SEPARATOR, len(MACHINE_FILES) - 1)
    for index, name in enumerate(MACHINE_FILES):
        path = _ROOT / name
        if index < len(parts):
            path.write_bytes(parts[index])
        else:
            path.unlink(missing_ok=True)
    facts = hwdetect.read_machine_facts(_ROOT)
    detection = hwdetect.choose_profile(hwdetect.AUTO, facts=facts, profiles=_PROFILES)
    detection.to_dict()
    hwdetect.check_bundle_compatible(None, [facts.machine, "any"], detection)
    for profile in _PROFILES:
        try:
            hwdetect.choose_profile(profile.name, facts=facts, profiles=_PROFILES).to_dict()
        except InvalidInputError:
            continue


def one_input(data: bytes) -> None:
    """Parse ``data[1:]`` as a profile or a machine root; raise only :data:`EXPECTED`."""
    if not data:
        return
    if data[0] % 2 == 0:
        _PROFILE.write_bytes(data[1:])
        hw.load_profile_file(_PROFILE).to_dict()
    else:
        _machine(data[1:])


def main() -> None:
    """Run libFuzzer with the command line's flags and corpus directories."""
    run_fuzzer(one_input, EXPECTED)


if __name__ == "__main__":
    main()
