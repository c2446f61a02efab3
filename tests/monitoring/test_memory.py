"""Memory stays flat over 1M inferences: the monitor's state is fixed-size counts, its row
buffers are preallocated, and a scored window replaces the last one.

The rows are offered the ways the device does: large batches (folded directly), small
batches (copied into the row buffers), single-row calls with their inference time (the
sampler's timed path; a slow model, so every call is taken), and a last stretch of
single-row calls of a 2 µs model, which the sampler mostly skips. Python's own allocator is traced
(tracemalloc, which numpy's buffers report to), so anything the monitor kept per row or
per window would show as growth between 100k and 1M rows.
"""

from __future__ import annotations

import gc
import time
import tracemalloc

import numpy as np

from edgepack.monitoring import Monitor, build_reference

FEATURES, CLASSES = 64, 10
BOUND_BYTES = 64 * 1024
"""Allowed difference of traced memory between 100k and 1M rows (the state is ~60 KB)."""


def _outputs(x: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    logits = x @ w
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)
    return {"label": probs.argmax(axis=1).astype(np.int64), "probabilities": probs}


class Feeder:
    """A pool of prepared batches (reused, so the test itself allocates nothing per row)."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        w = rng.normal(0, 1, (FEATURES, CLASSES)).astype(np.float32)
        ref = rng.random((2000, FEATURES), dtype=np.float32)
        self.reference = build_reference({"input": ref}, _outputs(ref, w))
        self.big = rng.random((1000, FEATURES), dtype=np.float32)
        self.big_out = _outputs(self.big, w)
        self.small = [self.big[i : i + 64] for i in range(0, 640, 64)]
        self.small_out = [
            {k: v[i : i + 64] for k, v in self.big_out.items()} for i in range(0, 640, 64)
        ]
        self.single = [self.big[i : i + 1] for i in range(1000)]
        self.single_out = [{k: v[i : i + 1] for k, v in self.big_out.items()} for i in range(1000)]
        self.offered = 0

    def feed(self, monitor: Monitor, until: int) -> None:
        """Offer rows until ``until`` in all: a batch of 1,000, ten of 64, 2,000 single rows."""
        while self.offered < until:
            monitor.observe({"input": self.big}, self.big_out)
            for x, out in zip(self.small, self.small_out, strict=True):
                monitor.observe({"input": x}, out)
            for i in range(2000):
                monitor.observe({"input": self.single[i % 1000]}, self.single_out[i % 1000], 1.0)
            self.offered += 1000 + 640 + 2000

    def sampled(self, monitor: Monitor, until: int) -> None:
        """Offer single rows of a 2 µs model until ``until``: the sampler skips most."""
        while self.offered < until:
            for i in range(1000):
                monitor.observe({"input": self.single[i]}, self.single_out[i], 2e-6)
            self.offered += 1000


def test_memory_stays_flat_over_one_million_rows() -> None:
    feeder = Feeder()
    monitor = Monitor(feeder.reference, seed=0)
    start = time.perf_counter()
    tracemalloc.start()
    try:
        feeder.feed(monitor, 100_000)
        monitor.to_dict()
        gc.collect()
        at_100k = tracemalloc.get_traced_memory()[0]
        windows_100k = monitor.windows
        feeder.feed(monitor, 900_000)
        folded = monitor.total_rows
        feeder.sampled(monitor, 1_000_000)
        monitor.to_dict()
        gc.collect()
        at_1m, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    seconds = time.perf_counter() - start
    assert feeder.offered >= 1_000_000 and folded >= 900_000  # every batch row folded
    assert monitor.windows > windows_100k > 0
    assert monitor.stride > 1 and monitor.total_rows < 1_000_000  # the sampler skipped
    growth = at_1m - at_100k
    assert abs(growth) < BOUND_BYTES, (at_100k, at_1m, peak)
    print(
        f"traced {at_100k} B at 100k rows, {at_1m} B at 1M (growth {growth} B, peak {peak} B), "
        f"{monitor.windows} windows, stride {monitor.stride}, {seconds:.1f} s"
    )
