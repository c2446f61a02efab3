"""Benchmark loading a model from memory (encrypted at rest) against loading it by path.

Run: ``.venv/bin/python benchmarks/bench_memload.py [--sizes-mb 100,1000] [--repeat 3]``.
A Gather over an external table of the given size (benchmarks/bench_agent.py's model);
``device_agent.memload.open_session_from_memory`` over the decrypted bytes against
``onnxruntime.InferenceSession(path)`` on the same files, in this process; the
baseline is ``memcpy`` of the table (``bytearray`` copy), so the ratio says how many
copies' worth of time onnxruntime's in-memory load costs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from bench_agent import ROWS, big_model_dir  # noqa: E402

from device_agent import memload  # noqa: E402


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes-mb", default="100,1000")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-memload-") as tmp:
        for size in [int(s) for s in args.sizes_mb.split(",") if s]:
            folder = Path(tmp) / f"m{size}"
            big_model_dir(folder, size)
            model = bytearray((folder / "model.onnx").read_bytes())
            table = bytearray((folder / "table.bin").read_bytes())
            files = {"model.onnx": memoryview(model), "table.bin": memoryview(table)}
            rows = len(table) // (ROWS * 4)
            feed = {"I": np.array([0, 1, rows // 2, rows - 1], np.int64)}
            memory, path, copy, grown = [], [], [], []
            for _ in range(args.repeat):
                start = time.perf_counter()
                duplicate = bytearray(table)
                copy.append(time.perf_counter() - start)
                del duplicate
                before = rss_mb()
                start = time.perf_counter()
                session = memload.open_session_from_memory(files, "model.onnx")
                memory.append(time.perf_counter() - start)
                grown.append(rss_mb() - before)
                out = session.run(None, feed)[0]
                del session
                start = time.perf_counter()
                by_path = ort.InferenceSession(
                    str(folder / "model.onnx"), providers=["CPUExecutionProvider"]
                )
                path.append(time.perf_counter() - start)
                assert np.array_equal(
                    by_path.run(None, feed)[0], out, equal_nan=True
                )  # random bits
                del by_path
            results.append(
                {
                    "size_mb": size,
                    "from_memory_s": statistics.median(memory),
                    "by_path_s": statistics.median(path),
                    "memcpy_s": statistics.median(copy),
                    "from_memory_per_memcpy": statistics.median(memory) / statistics.median(copy),
                    "rss_growth_mb": statistics.median(grown),
                }
            )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
