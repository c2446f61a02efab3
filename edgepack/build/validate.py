"""Validation of one model variant: onnx's full checker, an onnxruntime load, parity, cost.

Parity compares a candidate's outputs with reference outputs (the source
model or the fp32 ONNX) batch by batch: max abs diff, mean and min cosine
similarity per sample, top-1 agreement for classifiers and, with labels,
accuracy. Cost is the median single-thread latency of one batch and the
resident-memory growth while loading and running.

Quality is measured with the exact integer arithmetic ONNX defines (``exact_int8``),
not with whatever the build machine's int8 kernels do: on x86-64 with AVX2 but no
VNNI, onnxruntime's u8×s8 kernel adds pairs of products in saturating int16
(``vpmaddubsw``), an error the ARM and VNNI devices we build for never see.
"""

from __future__ import annotations

import re
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgepack.build.samples import Array, Feed, TensorSpec, numpy_dtype
from edgepack.errors import InvalidInputError

Outputs = list[list[Array]]


class UnsupportedOperatorError(InvalidInputError):
    """The profile's onnxruntime has no kernel for an operator of the model."""


@dataclass(frozen=True)
class Parity:
    """How close a candidate's outputs are to the reference outputs."""

    max_abs_diff: float
    mean_cosine: float
    min_cosine: float
    top1_agreement: float | None
    accuracy: float | None = None
    reference_accuracy: float | None = None

    @property
    def accuracy_drop(self) -> float | None:
        """Accuracy lost against labels, else the top-1 disagreement (an upper bound)."""
        if self.accuracy is not None and self.reference_accuracy is not None:
            return self.reference_accuracy - self.accuracy
        if self.top1_agreement is not None:
            return 1.0 - self.top1_agreement
        return None

    def as_dict(self) -> dict[str, Any]:
        """Plain form for reports and the bundle's quantisation metadata."""
        data = {k: _round(v) for k, v in asdict(self).items()}
        data["accuracy_drop"] = _round(self.accuracy_drop)
        return data


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


def check_model(path: Path) -> None:
    """onnx's full checker, by path so external data resolves against the model's folder."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise InvalidInputError(
            f"the model fails onnx's checker: {' '.join(str(exc).split())[:400]}"
        ) from exc


def model_io(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs (initializers excluded) and outputs of a model file, without loading its weights."""
    model = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        tensor = value.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor.shape.dim
        )
        return TensorSpec(value.name, numpy_dtype(tensor.elem_type), dims)

    inputs = [spec(v) for v in model.graph.input if v.name not in weights]
    return inputs, [spec(v) for v in model.graph.output]


def available_providers() -> list[str]:
    """Execution providers this machine's onnxruntime offers."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def open_session(
    path: Path, providers: Sequence[str], threads: int = 1, *, exact_int8: bool = False
) -> Any:
    """Load a model in onnxruntime on the given execution providers (those available here).

    With ``exact_int8`` the session computes int8 products exactly, as the spec
    defines them, whatever this machine's kernels do: ``MatMulInteger`` runs as a
    float64 ``MatMul`` of the zero-point-shifted integers (exact: every partial sum
    stays far below 2**53), and QDQ groups are not fused into ``QLinear*`` kernels,
    so dequantised weights meet dequantised activations in a float ``MatMul``/``Conv``.
    Fused contrib operators (``QAttention``, ``DynamicQuantizeLSTM``) keep their kernels.
    Use it to measure quality; measure speed without it.

    A missing kernel becomes an :class:`UnsupportedOperatorError` naming the operator.
    """
    import onnxruntime as ort

    available = set(available_providers())
    chosen = [p for p in providers if p in available] or ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source: str | bytes = str(path)
    rewritten: Path | None = None
    if exact_int8:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
        model = onnx.load(str(path), load_external_data=False)
        if _exact_integer_matmuls(model.graph):
            if any(_is_external(t) for t in model.graph.initializer):
                # External data resolves against the model's folder: write the copy beside it.
                rewritten = path.with_name(f".exact-{path.name}")
                onnx.save_model(model, str(rewritten))
                source = str(rewritten)
            else:
                source = model.SerializeToString()
    try:
        return ort.InferenceSession(source, options, providers=chosen)
    except Exception as exc:
        text = " ".join(str(exc).split())
        match = re.search(r"implementation for (\w+)\((\d+)\) node with name '([^']*)'", text)
        if match or "NOT_IMPLEMENTED" in text:
            op = (
                f"{match.group(1)} (opset {match.group(2)}, node {match.group(3)!r})"
                if match
                else "an operator"
            )
            raise UnsupportedOperatorError(
                f"onnxruntime ({', '.join(chosen)}) has no kernel for {op} of this model",
                hint="replace the operator, or build for a profile whose runtime supports it",
            ) from exc
        raise InvalidInputError(f"onnxruntime cannot load the model: {text[:400]}") from exc
    finally:
        if rewritten is not None:
            rewritten.unlink(missing_ok=True)


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _exact_integer_matmuls(graph: onnx.GraphProto) -> int:
    """Replace each ``MatMulInteger`` by its exact float64 equivalent; return how many.

    ``Y = (A - a_zero_point) @ (B - b_zero_point)`` in int32. The zero points are
    scalars or, for ``B``, one per output column (what ``quantize_dynamic`` writes),
    which broadcast as they are.
    """
    double, int32 = onnx.TensorProto.DOUBLE, onnx.TensorProto.INT32
    nodes: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        if node.op_type != "MatMulInteger" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        count += 1
        stem = f"{node.name or node.output[0]}_exact"
        shifted = []
        for slot in (0, 1):
            value, zero = (
                node.input[slot],
                node.input[slot + 2] if len(node.input) > slot + 2 else "",
            )
            as_double = f"{stem}_in{slot}"
            nodes.append(onnx.helper.make_node("Cast", [value], [as_double], to=double))
            if zero:
                zero_double = f"{stem}_zp{slot}"
                nodes.append(onnx.helper.make_node("Cast", [zero], [zero_double], to=double))
                nodes.append(
                    onnx.helper.make_node("Sub", [as_double, zero_double], [f"{as_double}_s"])
                )
                as_double = f"{as_double}_s"
            shifted.append(as_double)
        nodes.append(onnx.helper.make_node("MatMul", shifted, [f"{stem}_y"]))
        nodes.append(onnx.helper.make_node("Cast", [f"{stem}_y"], [node.output[0]], to=int32))
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
    return count


def run(session: Any, batches: Sequence[Feed]) -> Outputs:
    """Outputs of every batch, in the model's output order."""
    results: Outputs = []
    for feed in batches:
        try:
            results.append([np.asarray(o) for o in session.run(None, feed)])
        except Exception as exc:
            raise InvalidInputError(
                f"onnxruntime failed on the sample data: {' '.join(str(exc).split())[:300]}",
                hint="check that the sample data has the shapes and dtypes the model expects",
            ) from exc
    return results


def parity(
    reference: Outputs, candidate: Outputs, labels: Array | None, classifier: bool
) -> Parity:
    """Compare candidate outputs with reference outputs over all batches."""
    max_abs = 0.0
    cosines: list[Array] = []
    agree: list[Array] = []
    correct_ref: list[Array] = []
    correct: list[Array] = []
    offset = 0
    for ref_batch, cand_batch in zip(reference, candidate, strict=False):
        for ref, cand in zip(ref_batch, cand_batch, strict=False):
            ref = ref.reshape(cand.shape) if ref.size == cand.size else ref
            if ref.dtype.kind == "f" and cand.dtype.kind == "f":
                ref64, cand64 = ref.astype(np.float64), cand.astype(np.float64)
                if ref.size:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        max_abs = max(max_abs, float(np.nanmax(np.abs(ref64 - cand64))))
                    if not np.all(np.isfinite(cand64)):
                        max_abs = float("inf")
                cosines.append(_cosine(ref64, cand64))
                if classifier and ref.ndim == 2 and ref.shape[1] > 1:
                    agree.append(ref.argmax(1) == cand.argmax(1))
            elif ref.dtype.kind in "iub" and classifier:
                agree.append(ref.reshape(-1) == cand.reshape(-1))
        labels_batch = _labels_for(labels, offset, ref_batch)
        offset += len(ref_batch[0]) if ref_batch else 0
        predicted = _predicted(ref_batch, cand_batch) if labels is not None else None
        if labels_batch is not None and predicted is not None:
            correct_ref.append(predicted[0] == labels_batch)
            correct.append(predicted[1] == labels_batch)
    all_cos = np.concatenate(cosines) if cosines else np.ones(1)
    return Parity(
        max_abs_diff=max_abs,
        mean_cosine=float(np.mean(all_cos)),
        min_cosine=float(np.min(all_cos)),
        top1_agreement=float(np.mean(np.concatenate(agree))) if agree else None,
        accuracy=float(np.mean(np.concatenate(correct))) if correct else None,
        reference_accuracy=float(np.mean(np.concatenate(correct_ref))) if correct_ref else None,
    )


def _cosine(a: Array, b: Array) -> Array:
    rows = a.shape[0] if a.ndim > 1 else 1
    a2, b2 = a.reshape(rows, -1), b.reshape(rows, -1)
    a2, b2 = np.nan_to_num(a2), np.nan_to_num(b2, nan=0.0, posinf=0.0, neginf=0.0)
    norms = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
    dots = np.sum(a2 * b2, axis=1)
    both_zero = (np.linalg.norm(a2, axis=1) == 0) & (np.linalg.norm(b2, axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        result = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)
    return np.where(both_zero, 1.0, np.clip(result, -1.0, 1.0))


def _labels_for(labels: Array | None, start: int, batch: list[Array]) -> Array | None:
    if labels is None or not batch:
        return None
    rows = len(batch[0])
    return labels[start : start + rows].reshape(-1)


def _predicted(ref_batch: list[Array], cand_batch: list[Array]) -> tuple[Array, Array] | None:
    """Class predictions from the first label output, else the first 2-D score output."""
    for ref, cand in zip(ref_batch, cand_batch, strict=False):
        if ref.dtype.kind in "iu" and cand.size == ref.size:
            return ref.reshape(-1), cand.reshape(-1)
    for ref, cand in zip(ref_batch, cand_batch, strict=False):
        if ref.dtype.kind == "f" and ref.ndim == 2 and ref.shape[1] > 1:
            return ref.argmax(1), cand.argmax(1)
    return None


def latency_ms(session: Any, feed: Feed, repeats: int = 20, budget_s: float = 2.0) -> float:
    """Median wall time of repeated runs of one batch, after one warm-up run."""
    session.run(None, feed)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000.0)
        if time.perf_counter() > deadline and len(times) >= 3:
            break
    return statistics.median(times)


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux /proc, else the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
