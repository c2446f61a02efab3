"""The golden health set a bundle carries for the agent's on-device health check.

Layout and meaning are fixed in docs/architecture.md ("Health set"): arrays
``case{i}_in{j}`` / ``case{i}_out{k}`` in ``health/golden.npz``, each case one
exact batch (dynamic int8 output depends on batch composition), tolerances
derived from the quantisation error measured at build time, budgets from the
hardware profile. The file is written byte-for-byte deterministically.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.build.samples import Array, Feed
from edgepack.build.validate import Parity
from edgepack.hw import HardwareProfile

FILE = "health/golden.npz"
CASES = 3
ROWS_PER_CASE = 4
MIN_ATOL = 1e-4
RTOL = 1e-3
# Another CPU (ARM vs x86 kernels, VNNI or not) rounds int8 products differently; its error
# is of the order of the quantisation error itself, hence twice the measured error.
ERROR_MARGIN = 2.0
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)


def tolerances(parity: Parity, expected: Sequence[Sequence[Array]]) -> dict[str, float]:
    """atol/rtol for float outputs and the label agreement for integer outputs."""
    scale = max(
        (
            float(np.max(np.abs(o)))
            for case in expected
            for o in case
            if o.dtype.kind == "f" and o.size
        ),
        default=1.0,
    )
    atol = max(MIN_ATOL * max(1.0, scale), ERROR_MARGIN * parity.max_abs_diff)
    agreement = 1.0
    if parity.top1_agreement is not None:
        agreement = max(0.0, 1.0 - ERROR_MARGIN * (1.0 - parity.top1_agreement))
    return {"atol": float(f"{atol:.6g}"), "rtol": RTOL, "label_agreement": round(agreement, 6)}


def write(
    model_dir: Path,
    session: Any,
    cases: Sequence[Feed],
    parity: Parity,
    profile: HardwareProfile,
) -> dict[str, Any]:
    """Record ``cases`` with the final model's outputs; return the ``health`` metadata dict."""
    input_names = [i.name for i in session.get_inputs()]
    expected = [[np.asarray(o) for o in session.run(None, case)] for case in cases]
    arrays: list[tuple[str, Array]] = []
    for index, (case, outputs) in enumerate(zip(cases, expected, strict=False)):
        arrays += [(f"case{index}_in{j}", case[name]) for j, name in enumerate(input_names)]
        arrays += [(f"case{index}_out{k}", out) for k, out in enumerate(outputs)]
    target = model_dir / FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    write_npz(target, arrays)
    return {
        "file": FILE,
        "cases": len(cases),
        "tolerances": tolerances(parity, expected),
        "budgets": {
            "latency_ms": float(profile.health.latency_ms),
            "memory_mb": float(profile.health.memory_mb),
        },
    }


def write_npz(path: Path, arrays: Sequence[tuple[str, Array]]) -> None:
    """An ``.npz`` numpy reads, with fixed timestamps so the same arrays give the same bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays:
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_FIXED_TIME)
            info.external_attr = 0o644 << 16
            archive.writestr(info, buffer.getvalue())
