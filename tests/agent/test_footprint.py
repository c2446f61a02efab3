"""The device needs no builder packages: importing every agent module pulls in none of them."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import device_agent

BUILDER_ONLY = ["torch", "onnx", "skl2onnx", "sklearn", "onnxscript", "joblib"]


def test_agent_modules_import_no_builder_package() -> None:
    names = sorted(m.name for m in pkgutil.iter_modules(device_agent.__path__, "device_agent."))
    assert "device_agent.agent" in names and "device_agent.safeload" in names
    names = [n for n in names if n != "device_agent.__main__"]
    code = (
        "import importlib, sys\n"
        f"for n in {names!r}: importlib.import_module(n)\n"
        "import device_agent.cli\n"
        f"bad = [m for m in {BUILDER_ONLY!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.stdout.strip() == "", f"builder-only packages imported: {out.stdout.strip()}"
