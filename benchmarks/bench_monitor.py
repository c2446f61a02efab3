"""The cost of model monitoring: inference time with and without a Monitor, same process.

Per model and batch: blocks of calls run interleaved, plain ``session.run`` then
``session.run`` + ``Monitor.observe(inputs, outputs, seconds)``, so machine load hits
both alike; the figure of a block is its mean time per call (a mean, not a median of
calls, so the rare buffer folds and window scorings are paid for), and the table gives
the median over blocks. "every call" folds every inference (no sampling); "sampled"
lets the monitor pick its stride from the measured cost (budget 2 % of inference);
the loop asks ``Monitor.skips()`` first and times and gathers outputs only for the
sampled calls.
Also: the memory a Monitor holds (tracemalloc) after 10,000 and after 200,000 calls.

    .venv/bin/python benchmarks/bench_monitor.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgepack.monitoring import Monitor, build_reference

Feed = dict[str, np.ndarray]


def session(model: bytes | str) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def digits() -> tuple[Any, Feed, list[Feed]]:
    """The demo's digits MLP through skl2onnx; reference and feeds from its test split."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    from edgepack.demo import train

    model, x_test, _y, _d = train()
    proto = to_onnx(
        model, initial_types=[("input", FloatTensorType([None, 64]))], options={"zipmap": False}
    )
    feeds = [{"input": x_test[i : i + 1]} for i in range(len(x_test))]
    return session(proto.SerializeToString()), {"input": x_test}, feeds


def encoder(work: Path) -> Any:
    """The 256-wide, 4-layer encoder of bench_quantize.py, exported to ONNX (fp32)."""
    import torch

    from edgepack.build import build_variants
    from tests.build.models import TinyEncoder

    torch.manual_seed(0)
    model = TinyEncoder(vocab=1000, width=256).eval()
    model.encoder = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(
            256, 4, 1024, batch_first=True, dropout=0.0, activation="gelu"
        ),
        4,
        enable_nested_tensor=False,
    ).eval()
    example = np.random.default_rng(0).integers(0, 1000, (8, 16)).astype(np.int64)
    staged = build_variants(
        model,
        hw="intel-nuc",
        workdir=work / "encoder",
        quantize="none",
        example_inputs=(torch.from_numpy(example),),
        input_names=["ids"],
        dynamic_axes={"ids": {0: "batch", 1: "sequence"}},
        validation=[{"ids": example}],
    )
    return session(str(staged.fp32))


def measure(
    sess: Any, feeds: list[Feed], make: Callable[[], Monitor], calls: int, blocks: int
) -> tuple[float, float, Monitor]:
    """Median over blocks of the mean µs per call: plain, then monitored."""
    names = [o.name for o in sess.get_outputs()]
    monitor = make()
    plain: list[float] = []
    watched: list[float] = []
    for _ in range(2):  # warm-up, and the stride settles
        for feed in feeds[:calls]:
            start = time.perf_counter()
            out = sess.run(None, feed)
            monitor.observe(feed, dict(zip(names, out, strict=True)), time.perf_counter() - start)
    for _ in range(blocks):
        start = time.perf_counter()
        for i in range(calls):
            sess.run(None, feeds[i % len(feeds)])
        plain.append((time.perf_counter() - start) / calls * 1e6)
        start = time.perf_counter()
        for i in range(calls):
            feed = feeds[i % len(feeds)]
            if monitor.skips():  # as MonitoredSession should: nothing else on a skipped call
                sess.run(None, feed)
                continue
            t0 = time.perf_counter()
            out = sess.run(None, feed)
            monitor.observe(feed, dict(zip(names, out, strict=True)), time.perf_counter() - t0)
        watched.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(plain), statistics.median(watched), monitor


def held(make: Callable[[], Monitor], sess: Any, feeds: list[Feed], calls: int) -> int:
    """Bytes traced as allocated by a Monitor after ``calls`` monitored inferences."""
    names = [o.name for o in sess.get_outputs()]
    feeds = feeds[:200]
    outs = [dict(zip(names, sess.run(None, f), strict=True)) for f in feeds]
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    monitor = make()
    for i in range(calls):
        monitor.observe(feeds[i % len(feeds)], outs[i % len(feeds)], 15e-6)
    monitor.to_dict()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    size = sum(s.size_diff for s in after.compare_to(before, "filename"))
    del monitor
    return size


def row(label: str, plain: float, watched: float, monitor: Monitor) -> None:
    ratio = watched / plain
    print(
        f"| {label} | {plain:.1f} | {watched:.1f} | {ratio:.3f} | {(ratio - 1) * 100:+.1f} % "
        f"| {monitor.stride} | {int(monitor.window) * monitor.stride:,} |"
    )
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer blocks, digits only")
    args = parser.parse_args()
    blocks = 5 if args.quick else 15
    print(
        "| model, batch | sampling | plain µs/call | monitored µs/call | ratio | overhead "
        "| stride | inferences per window |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    sess, ref_inputs, feeds = digits()
    names = [o.name for o in sess.get_outputs()]
    reference = build_reference(
        ref_inputs, dict(zip(names, sess.run(None, ref_inputs), strict=True))
    )
    for label, budget in (("every call", 0.0), ("sampled", 0.02)):
        plain, watched, monitor = measure(
            sess, feeds, partial(Monitor, reference, budget=budget), 2000, blocks
        )
        row(f"digits MLP, 1 | {label}", plain, watched, monitor)
    small = held(lambda: Monitor(reference), sess, feeds, 10_000)
    large = held(lambda: Monitor(reference), sess, feeds, 200_000)
    memory = [f"digits MLP: {small:,} B after 10,000 calls, {large:,} B after 200,000"]
    if not args.quick:
        with tempfile.TemporaryDirectory(prefix="bench-monitor-") as scratch:
            enc = encoder(Path(scratch))
            rng = np.random.default_rng(1)
            ids = rng.integers(0, 1000, (512, 16)).astype(np.int64)
            out = enc.run(None, {"ids": ids})
            names = [o.name for o in enc.get_outputs()]
            ref = build_reference({"ids": ids}, dict(zip(names, out, strict=True)))
            for batch in (1, 16):
                feeds = [
                    {"ids": rng.integers(0, 1000, (batch, 16)).astype(np.int64)} for _ in range(64)
                ]
                calls = 200 if batch == 1 else 40
                for label, budget in (("every call", 0.0), ("sampled", 0.02)):
                    plain, watched, monitor = measure(
                        enc, feeds, partial(Monitor, ref, budget=budget), calls, blocks
                    )
                    row(f"encoder 256×4, {batch} | {label}", plain, watched, monitor)
            size = held(lambda: Monitor(ref), enc, feeds, 10_000)
            memory.append(f"encoder: {size:,} B after 10,000 calls")
    print("\nmemory held by a Monitor: " + "; ".join(memory))


if __name__ == "__main__":
    main()
