"""Pieces the fuzz harnesses share: what to instrument and a scratch directory.

Each harness runs as a module from the repository root (``python -m
tests.fuzz.fuzz_channel -max_total_time=60 CORPUS``) and exposes ``one_input``,
the entry point fed with untrusted bytes, which may raise only the project's own
errors (``EXPECTED``); :mod:`tests.fuzz.run` prepares the corpora and flags.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

# Modules whose code the fuzzer instruments for coverage: ours, and the pure-Python
# stdlib parsers our parsers stand on (json's scanner is C and stays opaque).
INSTRUMENTED = ("edgepack", "device_agent", "tomllib", "json")
# The hardware target's machine inputs: the files of a captured root, in this
# order, joined by this separator.
MACHINE_FILES = (
    "proc/sys/kernel/arch",
    "proc/cpuinfo",
    "proc/device-tree/model",
    "sys/class/dmi/id/product_name",
    "proc/meminfo",
)
MACHINE_SEPARATOR = b"\n=====\n"
_T = TypeVar("_T")
_R = TypeVar("_R")


SCRATCH_ENV = "EDGEPACK_FUZZ_SCRATCH"


def scratch_dir() -> Path:
    """A private directory for the files an entry point reads.

    Under ``$EDGEPACK_FUZZ_SCRATCH`` when set (the runner points it into its own
    output, because libFuzzer exits without running ``atexit``), else on tmpfs.
    """
    base = os.environ.get(SCRATCH_ENV) or ("/dev/shm" if Path("/dev/shm").is_dir() else None)
    path = Path(tempfile.mkdtemp(prefix="edgepack-fuzz-", dir=base))
    atexit.register(shutil.rmtree, path, True)
    return path


def reread(parse: Callable[[_T], _R], written: _T, expected: tuple[type[Exception], ...]) -> _R:
    """Parse what the project itself wrote back; refusing it is a finding, not an expected error."""
    try:
        return parse(written)
    except expected as exc:
        raise AssertionError(f"the reader refuses what the writer wrote: {exc}") from exc


def run_fuzzer(one_input: Callable[[bytes], None], expected: tuple[type[Exception], ...]) -> None:
    """Run libFuzzer (flags and corpus directories from the command line) on ``one_input``:
    the ``expected`` errors pass, anything else is a crash."""
    import sys

    import atheris  # type: ignore[import-untyped]  # ships no type hints

    def test_one_input(data: bytes) -> None:
        try:
            one_input(data)
        except expected:
            return

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
