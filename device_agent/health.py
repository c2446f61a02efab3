"""Run a bundle's golden health set on an installed revision with onnxruntime.

Format (docs/architecture.md "Health set"): ``meta/bundle.json`` key
``health`` names ``health/golden.npz`` holding ``case{i}_in{j}`` and
``case{i}_out{k}``; float outputs pass ``numpy.allclose(atol, rtol)``, integer
outputs pass when the fraction of equal elements reaches ``label_agreement``;
latency is the median of repeated runs of case 0; memory is the resident-set
growth while loading and running. Health checks are data, never code.

numpy and onnxruntime are imported only inside the check, which the agent runs in a
child process (:func:`check_revision_isolated`): the daemon that imports this module
holds neither (tests/agent/test_footprint.py).
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_agent import safeload
from device_agent.errors import HealthCheckError


@dataclass
class HealthReport:
    """What the health check measured."""

    cases: int
    latency_ms: float
    memory_mb: float
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when every case and budget passed."""
        return not self.failures


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _compare(name: str, actual: Any, expected: Any, tol: dict[str, float]) -> str | None:
    import numpy as np

    actual = np.asarray(actual)
    if actual.shape != expected.shape:
        return f"{name}: shape {actual.shape} differs from the golden {expected.shape}"
    if np.issubdtype(expected.dtype, np.floating):
        atol, rtol = float(tol.get("atol", 1e-4)), float(tol.get("rtol", 1e-3))
        if not np.allclose(actual, expected, atol=atol, rtol=rtol, equal_nan=True):
            worst = float(np.max(np.abs(actual.astype(np.float64) - expected)))
            return f"{name}: outputs differ from the golden ones (max abs diff {worst:.3g})"
        return None
    agreement = float(np.mean(actual == expected)) if expected.size else 1.0
    needed = float(tol.get("label_agreement", 1.0))
    if agreement < needed:
        return f"{name}: {agreement:.1%} of labels agree with the golden ones (< {needed:.1%})"
    return None


def check_revision(
    revision_dir: Path,
    model_relpath: str,
    health: dict[str, Any] | None,
    *,
    latency_runs: int = 5,
    budgets: dict[str, float] | None = None,
) -> HealthReport:
    """Load the revision's model by path and replay its golden cases.

    ``budgets`` (latency_ms, memory_mb) are the device profile's; each applies
    when it is stricter than the bundle's. Without a
    health set the check still proves the model loads safely.
    Raises :class:`HealthCheckError` when any case or budget fails.
    """
    import numpy as np
    import onnxruntime  # noqa: F401 - loaded first so its own size is not charged to the model

    rss_before = _rss_mb()
    session = safeload.open_session(revision_dir, model_relpath)
    if not health:
        return HealthReport(cases=0, latency_ms=0.0, memory_mb=max(0.0, _rss_mb() - rss_before))
    golden_path = safeload.check_location(revision_dir, str(health.get("file", "")))
    tol = dict(health.get("tolerances") or {})
    # The stricter of the bundle's budget and the device profile's wins.
    limits = {k: float(v) for k, v in dict(health.get("budgets") or {}).items()}
    for key, value in (budgets or {}).items():
        limits[key] = min(limits.get(key, float(value)), float(value))
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    failures: list[str] = []
    with np.load(golden_path, allow_pickle=False) as golden:
        cases = int(health.get("cases", 0))
        if cases < 1:
            raise HealthCheckError("the health set holds no cases")
        feeds: list[dict[str, Any]] = []
        for i in range(cases):
            try:
                feed = {n: golden[f"case{i}_in{j}"] for j, n in enumerate(inputs)}
                expected = [golden[f"case{i}_out{k}"] for k in range(len(outputs))]
            except KeyError as exc:
                raise HealthCheckError(f"the health set lacks {exc.args[0]}") from None
            feeds.append(feed)
            actual = session.run(outputs, feed)
            for k, name in enumerate(outputs):
                problem = _compare(f"case {i} output {name!r}", actual[k], expected[k], tol)
                if problem:
                    failures.append(problem)
    timings = []
    for _ in range(max(1, latency_runs)):
        start = time.perf_counter()
        session.run(outputs, feeds[0])
        timings.append((time.perf_counter() - start) * 1000)
    latency = statistics.median(timings)
    memory = max(0.0, _rss_mb() - rss_before)
    if "latency_ms" in limits and latency > float(limits["latency_ms"]):
        failures.append(f"latency {latency:.1f} ms exceeds the budget {limits['latency_ms']} ms")
    if "memory_mb" in limits and memory > float(limits["memory_mb"]):
        failures.append(f"memory {memory:.1f} MB exceeds the budget {limits['memory_mb']} MB")
    report = HealthReport(cases=cases, latency_ms=latency, memory_mb=memory, failures=failures)
    if failures:
        raise HealthCheckError("health check failed: " + "; ".join(failures[:3]))
    return report


# -- the check in a child process ------------------------------------------------------
# A validly signed model can still be hostile to the process that runs it: a custom op,
# a runtime error deep in a kernel, a tensor of terabytes, a loop that never ends. The
# check therefore runs in a child with an address-space and a time limit; whatever goes
# wrong there — an exception, a crash, the limit — is this release's health-check
# failure with its cause, and the agent itself keeps running.

_CHILD = "device_agent.health"
_RESULT_PREFIX = "edgepack-health-result "


def check_revision_isolated(
    revision_dir: Path,
    model_relpath: str,
    health: dict[str, Any] | None,
    *,
    latency_runs: int = 5,
    budgets: dict[str, float] | None = None,
    timeout_s: float = 300.0,
    memory_mb: int = 0,
) -> HealthReport:
    """:func:`check_revision` in a child process, bounded by ``timeout_s`` and ``memory_mb``.

    ``memory_mb`` caps the child's address space (``RLIMIT_AS``; 0: no cap beyond
    the machine's). Raises :class:`HealthCheckError` for every way the check can
    fail, the cause in its message.
    """
    import subprocess

    from device_agent import _child

    request = {
        "revision_dir": str(revision_dir),
        "model_relpath": model_relpath,
        "health": health,
        "latency_runs": latency_runs,
        "budgets": budgets,
        "memory_mb": memory_mb,
    }
    try:
        result = _child.call(_CHILD, _RESULT_PREFIX, request, timeout_s)
    except subprocess.TimeoutExpired:
        raise HealthCheckError(
            f"health check failed: the model did not finish its health check in {timeout_s:g} s"
        ) from None
    except _child.ChildEndedError as exc:
        raise HealthCheckError(
            f"health check failed: the process running the model {exc.why}"
        ) from None
    if result.get("error"):
        raise HealthCheckError(str(result["error"]))
    return HealthReport(**result["report"])


def _child_main() -> None:
    """Run one check from a JSON request on stdin; print the result as one line."""
    from device_agent import _child

    request = _child.request()
    memory_mb = int(request.get("memory_mb") or 0)
    if memory_mb > 0:
        cap = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    result: dict[str, Any]
    try:
        report = check_revision(
            Path(request["revision_dir"]),
            str(request["model_relpath"]),
            request.get("health"),
            latency_runs=int(request.get("latency_runs", 5)),
            budgets=request.get("budgets"),
        )
        result = {"report": dataclasses.asdict(report)}
    except HealthCheckError as exc:
        result = {"error": str(exc)}
    except MemoryError:
        result = {"error": f"health check failed: the model needs more than {memory_mb} MB"}
    except Exception as exc:  # the model failed to load or run: that is its verdict
        detail = " ".join(str(exc).split())[:500]
        result = {
            "error": f"health check failed: the model cannot be loaded or run here "
            f"({type(exc).__name__}: {detail})"
        }
    _child.answer(_RESULT_PREFIX, result)


if __name__ == "__main__":
    _child_main()
