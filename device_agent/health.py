"""Run a bundle's golden health set on an installed revision with onnxruntime.

Format (docs/architecture.md "Health set"): ``meta/bundle.json`` key
``health`` names ``health/golden.npz`` holding ``case{i}_in{j}`` and
``case{i}_out{k}``; float outputs pass ``numpy.allclose(atol, rtol)``, integer
outputs pass when the fraction of equal elements reaches ``label_agreement``;
latency is the median of repeated runs of case 0; memory is the resident-set
growth while loading and running. Health checks are data, never code.

A plain revision is checked by path (:func:`check_revision`); an encrypted one is
decrypted into memory and checked there (:func:`check_files`, through
``device_agent.memload``), so no plaintext reaches the disk.

numpy and onnxruntime are imported only inside the check, which the agent runs in a
child process (:func:`check_revision_isolated`): the daemon that imports this module
holds neither (tests/agent/test_footprint.py).
"""

from __future__ import annotations

import dataclasses
import io
import resource
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_agent import _child, memload, safeload
from device_agent.errors import CorruptRevisionError, HealthCheckError, UnsafeModelError


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
    """Load a plain revision's model by path and replay its golden cases.

    ``budgets`` (latency_ms, memory_mb) are the device profile's; each applies
    when it is stricter than the bundle's. Without a
    health set the check still proves the model loads safely.
    Raises :class:`HealthCheckError` when any case or budget fails.
    """

    def golden(rel: str) -> Any:
        import numpy as np

        return np.load(safeload.check_location(revision_dir, rel), allow_pickle=False)

    return _check(
        lambda: safeload.open_session(revision_dir, model_relpath),
        golden,
        health,
        latency_runs=latency_runs,
        budgets=budgets,
    )


def check_files(
    files: Mapping[str, memoryview],
    model_rel: str,
    health: dict[str, Any] | None,
    *,
    latency_runs: int = 5,
    budgets: dict[str, float] | None = None,
) -> HealthReport:
    """:func:`check_revision` on a payload held in memory (an encrypted revision, decrypted).

    The model loads through :func:`device_agent.memload.open_session_from_memory`
    and the golden set is read from its buffer: nothing is read from or written
    to disk. ``memory_mb`` counts what loading and running add, not the
    decrypted payload already held.
    """

    def golden(rel: str) -> Any:
        import numpy as np

        view = files.get(rel)
        if view is None:
            raise UnsafeModelError(f"the health set {rel!r} is not in the revision's payload")
        return np.load(io.BytesIO(bytes(view)), allow_pickle=False)

    return _check(
        lambda: memload.open_session_from_memory(files, model_rel),
        golden,
        health,
        latency_runs=latency_runs,
        budgets=budgets,
    )


def _check(
    open_session: Callable[[], Any],
    open_golden: Callable[[str], Any],
    health: dict[str, Any] | None,
    *,
    latency_runs: int,
    budgets: dict[str, float] | None,
) -> HealthReport:
    """The check itself, whatever holds the revision: load, replay, time, measure."""
    import numpy  # noqa: F401 - loaded first, like onnxruntime
    import onnxruntime  # noqa: F401 - loaded first so its own size is not charged to the model

    rss_before = _rss_mb()
    session = open_session()
    if not health:
        return HealthReport(cases=0, latency_ms=0.0, memory_mb=max(0.0, _rss_mb() - rss_before))
    golden_file = open_golden(str(health.get("file", "")))
    tol = dict(health.get("tolerances") or {})
    # The stricter of the bundle's budget and the device profile's wins.
    limits = {k: float(v) for k, v in dict(health.get("budgets") or {}).items()}
    for key, value in (budgets or {}).items():
        limits[key] = min(limits.get(key, float(value)), float(value))
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    failures: list[str] = []
    with golden_file as golden:
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

CHILD_MODULE = _CHILD = "device_agent.health"
_RESULT_PREFIX = "edgepack-health-result "
_CORRUPT = "corrupt-revision"  # the result's error_kind when the encrypted revision is damaged


def check_revision_isolated(
    revision_dir: Path,
    model_relpath: str,
    health: dict[str, Any] | None,
    *,
    latency_runs: int = 5,
    budgets: dict[str, float] | None = None,
    timeout_s: float = 300.0,
    memory_mb: int = 0,
    content_key: bytes | None = None,
    check_digests: bool = True,
    warm: _child.Warm | None = None,
) -> HealthReport:
    """:func:`check_revision` in a child process, bounded by ``timeout_s`` and ``memory_mb``.

    ``memory_mb`` caps the child's address space (``RLIMIT_AS``; 0: no cap beyond
    the machine's). With ``content_key``, ``revision_dir`` is an encrypted
    revision: the child decrypts its ``bundle.epk`` into memory (every tag and
    every signed digest checked) and runs :func:`check_files`; the key travels
    hex-encoded in the request on the child's stdin, never in its argv or a file.
    ``check_digests=False`` skips re-hashing the payload files when the caller has
    checked them against the signed manifest already (while the bundle downloaded);
    every segment's tag is checked regardless. ``warm`` is a :class:`_child.Warm`
    child of this module started ahead, used instead of a new one.
    Raises :class:`CorruptRevisionError` when the encrypted revision is damaged,
    and :class:`HealthCheckError` for every other way the check can fail, the
    cause in its message.
    """
    import subprocess

    request = {
        "revision_dir": str(revision_dir),
        "model_relpath": model_relpath,
        "health": health,
        "latency_runs": latency_runs,
        "budgets": budgets,
        "memory_mb": memory_mb,
    }
    if content_key is not None:
        request["content_key"] = content_key.hex()
        request["check_digests"] = check_digests
    try:
        result = _child.call(_CHILD, _RESULT_PREFIX, request, timeout_s, warm)
    except subprocess.TimeoutExpired:
        raise HealthCheckError(
            f"health check failed: the model did not finish its health check in {timeout_s:g} s"
        ) from None
    except _child.ChildEndedError as exc:
        raise HealthCheckError(
            f"health check failed: the process running the model {exc.why}"
        ) from None
    if result.get("error_kind") == _CORRUPT:
        raise CorruptRevisionError(str(result["error"]), hint=result.get("hint"))
    if result.get("error"):
        raise HealthCheckError(str(result["error"]))
    return HealthReport(**result["report"])


def _child_main() -> None:
    """Run one check from a JSON request on stdin; print the result as one line."""
    from device_agent import _child, _crashpoint

    # The crash harness's kill in here (decrypt-memory) stands for a power cut: the
    # agent waiting on this check dies with it.
    _crashpoint.kill_parent_too()
    # Imported before the request is read, so a child started ahead (_child.Warm) has
    # them loaded by the time the revision is ready.
    import numpy  # noqa: F401
    import onnxruntime  # noqa: F401

    request = _child.request()
    memory_mb = int(request.get("memory_mb") or 0)
    if memory_mb > 0:
        cap = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    result: dict[str, Any]
    try:
        report = _child_check(request)
        result = {"report": dataclasses.asdict(report)}
    except CorruptRevisionError as exc:
        result = {"error": exc.message, "hint": exc.hint, "error_kind": _CORRUPT}
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


def _child_check(request: dict[str, Any]) -> HealthReport:
    """The check a request asks for: on a plain revision, or on an encrypted one in memory."""
    revision_dir = Path(request["revision_dir"])
    model_relpath = str(request["model_relpath"])
    latency_runs = int(request.get("latency_runs", 5))
    key_hex = request.get("content_key")
    if key_hex is None:
        return check_revision(
            revision_dir,
            model_relpath,
            request.get("health"),
            latency_runs=latency_runs,
            budgets=request.get("budgets"),
        )
    from device_agent import atrest

    decrypted = atrest.decrypt_bundle(
        revision_dir / atrest.BUNDLE_FILE,
        bytes.fromhex(str(key_hex)),
        check_digests=request.get("check_digests") is not False,
    )
    try:
        return check_files(
            decrypted.files,
            model_relpath,
            request.get("health"),
            latency_runs=latency_runs,
            budgets=request.get("budgets"),
        )
    finally:
        decrypted.wipe()


if __name__ == "__main__":
    _child_main()
