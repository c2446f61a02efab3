"""Quantisation recipes (none, fp16, dynamic, static) built on onnxruntime's tooling.

Every tool runs in a private temporary directory. This module applies one
recipe and measures the result; :mod:`edgepack.build.search` chooses between
recipes (``auto``) and enforces the quality target.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgepack.build import validate
from edgepack.build._util import private_cwd, quiet, tree_size
from edgepack.build.samples import Feed, SampleSet
from edgepack.build.validate import Outputs, Parity
from edgepack.errors import EdgepackError, InvalidInputError

RECIPES = ("none", "fp16", "dynamic", "static", "auto")
WEIGHTED_OPS = ("MatMul", "Gemm", "Conv", "Gather")
# Dynamic int8 leaves convolutions in fp32: onnxruntime's ConvInteger runs about 6x slower
# than the fp32 Conv on CPU (digits CNN, benchmarks/bench_quantize.py). Static QDQ covers CNNs.
DYNAMIC_OPS = ("MatMul", "Gemm", "Gather", "Attention", "LSTM", "EmbedLayerNormalization")
LARGE_MODEL = 1536 * 2**20  # above this, tools write external data (protobuf's limit is 2 GiB)

Metric = Callable[[Outputs, Outputs], float]


class QualityTargetError(EdgepackError):
    """No recipe met the quality target; carries the best that was reached."""

    def __init__(self, message: str, *, best: Trial | None, tried: list[Trial]) -> None:
        super().__init__(
            message, hint="relax --min-cosine / --max-accuracy-drop, or choose another recipe"
        )
        self.best = best
        self.tried = tried


@dataclass(frozen=True)
class Recipe:
    """One way of quantising: kind plus parameters and the nodes left in float."""

    kind: str
    per_channel: bool = True
    weight_type: str = "int8"
    activation_type: str = "uint8"
    reduce_range: bool = False
    exclude: tuple[str, ...] = ()

    def label(self) -> str:
        """Short human description, e.g. ``dynamic int8 per-channel, 3 nodes in fp32``."""
        if self.kind in ("none", "fp16"):
            return "fp32 (no quantisation)" if self.kind == "none" else "fp16"
        text = (
            f"{self.kind} {self.weight_type} {'per-channel' if self.per_channel else 'per-tensor'}"
        )
        if self.kind == "static":
            text += f" QDQ (activations {self.activation_type})"
        if self.reduce_range:
            text += ", reduced range"
        if self.exclude:
            text += f", {len(self.exclude)} node{'s' if len(self.exclude) > 1 else ''} kept in fp32"
        return text

    def parameters(self) -> dict[str, Any]:
        """Parameters recorded in the bundle's quantisation metadata."""
        if self.kind in ("none", "fp16"):
            return {}
        params: dict[str, Any] = {
            "weight_type": self.weight_type,
            "per_channel": self.per_channel,
            "reduce_range": self.reduce_range,
        }
        if self.kind == "static":
            params.update(activation_type=self.activation_type, format="QDQ", calibration="minmax")
        return params


@dataclass(frozen=True)
class Target:
    """The quality a variant must keep relative to the fp32 model."""

    min_cosine: float | None = None
    max_accuracy_drop: float | None = None
    metric: Metric | None = None
    min_metric: float | None = None

    def unmet(self, parity: Parity, metric_value: float | None) -> list[str]:
        """Reasons the figures miss the target (empty when it holds)."""
        reasons = []
        if self.min_cosine is not None and not parity.mean_cosine >= self.min_cosine:
            reasons.append(f"mean cosine {parity.mean_cosine:.4f} < {self.min_cosine}")
        drop = parity.accuracy_drop
        if self.max_accuracy_drop is not None:
            if drop is None:
                reasons.append("no accuracy figure (give labels or a classifier)")
            elif drop > self.max_accuracy_drop + 1e-12:
                reasons.append(f"accuracy drop {drop:.4f} > {self.max_accuracy_drop}")
        if self.min_metric is not None and (metric_value is None or metric_value < self.min_metric):
            reasons.append(
                f"metric {metric_value:.4g} < {self.min_metric}"
                if metric_value is not None
                else "no metric value"
            )
        return reasons

    def describe(self) -> str:
        """The target as one phrase."""
        parts = []
        if self.min_cosine is not None:
            parts.append(f"mean cosine ≥ {self.min_cosine}")
        if self.max_accuracy_drop is not None:
            parts.append(f"accuracy drop ≤ {self.max_accuracy_drop}")
        if self.min_metric is not None:
            parts.append(f"metric ≥ {self.min_metric}")
        return " and ".join(parts) or "none"


@dataclass
class Trial:
    """One quantised candidate and how it measured."""

    recipe: Recipe
    path: Path
    parity: Parity
    metric: float | None
    unmet: list[str]
    size: int
    latency_ms: float

    @property
    def passes(self) -> bool:
        """Whether the candidate meets the target."""
        return not self.unmet

    def score(self) -> tuple[bool, float, float]:
        """Order candidates: passing first, then quality (mean cosine, then accuracy)."""
        drop = self.parity.accuracy_drop
        return (self.passes, self.parity.mean_cosine, -(drop or 0.0))

    def summary(self) -> dict[str, Any]:
        """Plain form for the report's list of what was tried."""
        return {
            "recipe": self.recipe.label(),
            "quality": self.parity.as_dict(),
            "metric": self.metric,
            "size_bytes": self.size,
            "latency_ms": round(self.latency_ms, 3),
            "meets_target": self.passes,
            "unmet": self.unmet,
        }


@dataclass
class Evaluator:
    """Measures candidates against the fp32 model's outputs on the validation data."""

    validation: SampleSet
    reference: Outputs
    classifier: bool
    providers: Sequence[str]
    target: Target
    # Quality from the exact int8 arithmetic of the device rather than this machine's kernels
    # (see validate.open_session); False only for a device whose own kernels saturate.
    exact_int8: bool = True
    trials: list[Trial] = field(default_factory=list)

    def session(self, path: Path) -> Any:
        """A session computing what the device computes, for measuring quality."""
        return validate.open_session(path, self.providers, exact_int8=self.exact_int8)

    def evaluate(self, recipe: Recipe, path: Path) -> Trial:
        """Load and run a candidate, compare it with fp32, and remember the trial."""
        session = self.session(path)
        outputs = validate.run(session, self.validation.batches)
        parity = validate.parity(self.reference, outputs, self.validation.labels, self.classifier)
        metric = self.target.metric(self.reference, outputs) if self.target.metric else None
        if self.exact_int8:  # speed is that of the real kernels
            session = validate.open_session(path, self.providers)
        latency = validate.latency_ms(session, self.validation.batches[0], repeats=10, budget_s=0.5)
        trial = Trial(
            recipe,
            path,
            parity,
            metric,
            self.target.unmet(parity, metric),
            tree_size(path.parent),
            latency,
        )
        self.trials.append(trial)
        return trial


def device_int8_is_exact(
    architecture: str, cpu_features: Sequence[str], reduce_range: bool
) -> bool:
    """Whether a device's int8 kernels compute the exact products ONNX defines.

    ARM's kernels widen before adding and VNNI adds in int32; x86-64 without VNNI
    adds pairs of u8×s8 products in saturating int16, unless reduced-range (7-bit)
    weights keep every pair below the limit.
    """
    vnni = {"avx512_vnni", "avx_vnni", "amx_int8"}
    return architecture != "x86_64" or reduce_range or bool(vnni & set(cpu_features))


class Quantizer:
    """Applies recipes to one fp32 model inside a working directory."""

    def __init__(self, fp32: Path, workdir: Path, calibration: SampleSet | None) -> None:
        self.fp32 = fp32
        self.workdir = workdir
        self.calibration = calibration
        self.large = tree_size(fp32.parent) > LARGE_MODEL
        self.notes: list[str] = []
        self._prepared: Path | None = None
        self._count = 0

    def prepared(self) -> Path:
        """The fp32 model after onnxruntime's pre-processing, every node named."""
        if self._prepared is None:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            target = self.workdir / "prepared" / "model.onnx"
            target.parent.mkdir(parents=True)
            source = self.fp32
            if not self.large and len(list(self.fp32.parent.iterdir())) > 1:
                # quant_pre_process copies the model without its side files: inline them first.
                source = self.workdir / "inlined" / "model.onnx"
                source.parent.mkdir()
                _save(onnx.load(str(self.fp32)), source, large=False)
            try:
                # Symbolic shape inference fails on transformer exports ("Incomplete symbolic
                # shape inference"); onnx's shape inference and the optimiser are enough.
                with private_cwd(self.workdir), quiet():
                    quant_pre_process(
                        str(source),
                        str(target),
                        skip_symbolic_shape=True,
                        save_as_external_data=self.large,
                        all_tensors_to_one_file=True,
                        external_data_location="model.onnx.data" if self.large else None,
                    )
            except Exception as exc:
                self.notes.append(f"pre-processing skipped: {' '.join(str(exc).split())[:160]}")
                shutil.rmtree(target.parent)
                shutil.copytree(self.fp32.parent, target.parent)
            _name_nodes(target, self.large)
            self._prepared = target
        return self._prepared

    def weighted_nodes(self) -> dict[str, int]:
        """Quantisable nodes with a constant weight, mapped to that weight's size in bytes."""
        model = onnx.load(str(self.prepared()), load_external_data=False)
        sizes = {t.name: int(np.prod(t.dims, dtype=np.int64)) * 4 for t in model.graph.initializer}
        weighted = {}
        for node in model.graph.node:
            slot = 0 if node.op_type == "Gather" else 1  # embedding table / weight matrix
            if (
                node.op_type in WEIGHTED_OPS
                and len(node.input) > slot
                and node.input[slot] in sizes
            ):
                weighted[node.name] = sizes[node.input[slot]]
        return weighted

    def apply(self, recipe: Recipe, only: Sequence[str] | None = None) -> Path:
        """Write the model quantised with ``recipe`` to a fresh directory; return its path."""
        self._count += 1
        target = self.workdir / f"candidate-{self._count}" / "model.onnx"
        target.parent.mkdir(parents=True)
        if recipe.kind == "none":
            shutil.copytree(self.fp32.parent, target.parent, dirs_exist_ok=True)
            return target
        try:
            with private_cwd(self.workdir), quiet():
                if recipe.kind == "fp16":
                    self._fp16(target)
                elif recipe.kind == "dynamic":
                    self._dynamic(recipe, target, only)
                elif recipe.kind == "static":
                    self._static(recipe, target, only)
                else:
                    raise InvalidInputError(f"unknown quantisation recipe {recipe.kind!r}")
        except EdgepackError:
            raise
        except Exception as exc:
            raise InvalidInputError(
                f"{recipe.label()} quantisation failed: {' '.join(str(exc).split())[:300]}",
                hint="try another --quantize recipe",
            ) from exc
        return target

    def _fp16(self, target: Path) -> None:
        # onnxruntime's own converter; onnxconverter-common's output fails to load in onnxruntime.
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = onnx.load(str(self.fp32))
        converted = convert_float_to_float16(
            model, keep_io_types=True, disable_shape_infer=self.large
        )
        # keep_io_types appends the input Casts at the end of the node list; onnxruntime
        # does not mind, onnx's checker (rightly) does.
        _sort_nodes(converted.graph)
        _save(converted, target, self.large)

    def _dynamic(self, recipe: Recipe, target: Path, only: Sequence[str] | None) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            str(self.prepared()),
            str(target),
            per_channel=recipe.per_channel,
            reduce_range=recipe.reduce_range,
            weight_type=QuantType.QUInt8 if recipe.weight_type == "uint8" else QuantType.QInt8,
            nodes_to_quantize=_with_gemm_names(only) if only else None,
            nodes_to_exclude=_with_gemm_names(recipe.exclude),
            use_external_data_format=self.large,
            op_types_to_quantize=list(DYNAMIC_OPS),
            extra_options={"MatMulConstBOnly": True},
        )

    def _static(self, recipe: Recipe, target: Path, only: Sequence[str] | None) -> None:
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        if self.calibration is None:
            raise InvalidInputError(
                "static quantisation needs calibration data",
                hint="pass --calibration DATA (.npy/.npz or a directory of them)",
            )
        types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
        quantize_static(
            str(self.prepared()),
            str(target),
            _Reader(self.calibration.batches),
            quant_format=QuantFormat.QDQ,
            per_channel=recipe.per_channel,
            reduce_range=recipe.reduce_range,
            activation_type=types[recipe.activation_type],
            weight_type=types[recipe.weight_type],
            nodes_to_quantize=list(only) if only else None,
            nodes_to_exclude=list(recipe.exclude),
            use_external_data_format=self.large,
            # MinMax: percentile/entropy calibrators crash on variable-length batches.
            calibrate_method=CalibrationMethod.MinMax,
            # The int32-bias weight-scale adjustment crashes on per-channel Gemm weights
            # (onnxruntime 1.32: "truth value of an array ... is ambiguous").
            extra_options={"MatMulConstBOnly": True, "QDQDisableWeightAdjustForInt32Bias": True},
        )


def _with_gemm_names(names: Sequence[str]) -> list[str]:
    """Dynamic quantisation turns Gemm ``X`` into MatMul ``X_MatMul`` first; name both."""
    return [*names, *(f"{name}_MatMul" for name in names)]


class _Reader:
    """onnxruntime CalibrationDataReader over our sample batches."""

    def __init__(self, batches: Sequence[Feed]) -> None:
        self._batches = list(batches)
        self._index = 0

    def get_next(self) -> Feed | None:
        if self._index >= len(self._batches):
            return None
        self._index += 1
        return self._batches[self._index - 1]

    def rewind(self) -> None:
        self._index = 0


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """Order nodes topologically (stable), as the ONNX spec requires."""
    produced = {o for node in graph.node for o in node.output if o}
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(not i or i in ready or i not in produced for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):  # a cycle: leave the rest as it was for the checker
            ordered.extend(rest)
            break
        pending = rest
    copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered]
    del graph.node[:]
    graph.node.extend(copies)


def _name_nodes(path: Path, large: bool) -> None:
    """Give every node a unique name: exclusion lists refer to nodes by name."""
    model = onnx.load(str(path))
    seen: set[str] = set()
    changed = False
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}"
            changed = True
        seen.add(node.name)
    if changed:
        _save(model, path, large)


def _save(model: onnx.ModelProto, target: Path, large: bool) -> None:
    for stale in target.parent.glob("model.onnx*"):
        stale.unlink()
    onnx.save_model(
        model,
        str(target),
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
    )
