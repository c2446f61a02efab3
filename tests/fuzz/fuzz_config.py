"""Fuzz target: the agent's configuration reader (``DATA/config.toml``).

Entry point: :func:`device_agent.config.load` on a data directory whose
``config.toml`` holds the input. Accepted outcomes: success, or
:class:`~edgepack.errors.InvalidInputError`. Anything else is a finding, and so
is a success that yields a field of the wrong type, a negative or non-finite
limit, or a configuration that :func:`~device_agent.config.dumps` cannot write
back to TOML that loads to the same configuration.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext

import atheris  # type: ignore[import-untyped]  # ships no type hints

from tests.fuzz._common import INSTRUMENTED, reread, run_fuzzer, scratch_dir

# Instrument only when fuzzing: a test importing this module runs the code plain.
with atheris.instrument_imports(include=INSTRUMENTED) if __name__ == "__main__" else nullcontext():
    from device_agent import config
    from edgepack.errors import InvalidInputError

EXPECTED: tuple[type[Exception], ...] = (InvalidInputError,)
_DATA = scratch_dir()
_AGAIN = scratch_dir()


def _check_types(cfg: config.AgentConfig) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "models":
            ok = isinstance(value, list) and all(isinstance(m, str) for m in value)
        elif f.name in ("data_dir", "limits"):
            continue
        elif isinstance(f.default, bool):  # monitoring
            ok = isinstance(value, bool)
        elif isinstance(f.default, int | float):  # the monitor_* thresholds
            ok = (
                not isinstance(value, bool)
                and isinstance(
                    value, type(f.default) if isinstance(f.default, int) else int | float
                )
                and math.isfinite(value)
                and value >= 0
            )
        else:
            ok = isinstance(value, str)
        if not ok:
            raise AssertionError(f"config field {f.name} is {type(value).__name__}")
    for f in dataclasses.fields(cfg.limits):
        value = getattr(cfg.limits, f.name)
        wanted = (int,) if isinstance(f.default, int) else (int, float)
        if isinstance(value, bool) or not isinstance(value, wanted):
            raise AssertionError(f"limit {f.name} is {type(value).__name__}")
        if not math.isfinite(value) or value < 0:
            raise AssertionError(f"limit {f.name} is {value!r}")


def one_input(data: bytes) -> None:
    """Load ``data`` as ``config.toml``; raise only :data:`EXPECTED`."""
    (_DATA / config.CONFIG_NAME).write_bytes(data)
    cfg = config.load(_DATA)
    _check_types(cfg)
    (_AGAIN / config.CONFIG_NAME).write_text(config.dumps(cfg))
    again = reread(config.load, _AGAIN, EXPECTED)
    if dataclasses.replace(again, data_dir=_DATA) != cfg:
        raise AssertionError("the configuration does not survive dumps and load")


def main() -> None:
    """Run libFuzzer with the command line's flags and corpus directories."""
    run_fuzzer(one_input, EXPECTED)


if __name__ == "__main__":
    main()
