"""Quantisation recipes (none, fp16, dynamic, static, auto) built on onnxruntime's tooling.

Every tool runs in a private temporary directory. ``auto`` tries the int8
recipes, keeps the best, and when the quality target is not met excludes the
nodes most sensitive to quantisation (each measured by quantising it alone)
until the target holds, never giving up more than half of the quantisable
weights; it explains what it chose and why.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
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
SAME_SPEED = 1.15  # latencies within 15% count as equal when choosing between recipes
LARGE_MODEL = 1536 * 2**20  # above this, tools write external data (protobuf's limit is 2 GiB)
MAX_EXCLUDED_WEIGHT_SHARE = 0.5
MAX_SENSITIVITY_NODES = 96

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
    trials: list[Trial] = field(default_factory=list)

    def evaluate(self, recipe: Recipe, path: Path) -> Trial:
        """Load and run a candidate, compare it with fp32, and remember the trial."""
        session = validate.open_session(path, self.providers)
        outputs = validate.run(session, self.validation.batches)
        parity = validate.parity(self.reference, outputs, self.validation.labels, self.classifier)
        metric = self.target.metric(self.reference, outputs) if self.target.metric else None
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


@dataclass
class Choice:
    """The trial a recipe settled on and why."""

    trial: Trial
    reason: str
    sensitivity: list[tuple[str, float]] = field(default_factory=list)


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


def choose(
    kind: str,
    base: Recipe,
    quantizer: Quantizer,
    evaluator: Evaluator,
    progress: Callable[[str], None] = lambda _: None,
) -> Choice:
    """Quantise with an explicit recipe or search with ``auto``; enforce the target."""
    if kind != "auto":
        recipe = replace(base, kind=kind)
        progress(recipe.label())
        trial = evaluator.evaluate(recipe, quantizer.apply(recipe))
        if not trial.passes:
            _fail(f"the {recipe.label()} variant misses the quality target", evaluator)
        return Choice(
            trial,
            f"{recipe.label()} was requested; it meets the target ({evaluator.target.describe()})",
        )
    return _auto(base, quantizer, evaluator, progress)


def _auto(
    base: Recipe, quantizer: Quantizer, evaluator: Evaluator, progress: Callable[[str], None]
) -> Choice:
    weights = quantizer.weighted_nodes()
    if not weights:
        recipe = replace(base, kind="none")
        trial = evaluator.evaluate(recipe, quantizer.apply(recipe))
        return Choice(trial, "the model has no MatMul/Gemm/Conv weights to quantise; kept fp32")
    candidates = [replace(base, kind="dynamic", per_channel=True)]
    skipped = ""
    if quantizer.calibration is not None:
        candidates.append(replace(base, kind="static", per_channel=True))
    else:
        skipped = "; static QDQ not tried (no calibration data)"
    trials = []
    for recipe in candidates:
        progress(recipe.label())
        trials.append(evaluator.evaluate(recipe, quantizer.apply(recipe)))
    best = max(trials, key=Trial.score)
    tried = ", ".join(
        f"{t.recipe.label()}: cosine {t.parity.mean_cosine:.4f}, {t.latency_ms:.2f} ms"
        for t in trials
    )
    passing = [t for t in trials if t.passes]
    if passing:
        # Among recipes that meet the target the fastest wins; near-ties go to the smaller.
        fastest = min(t.latency_ms for t in passing)
        quick = [t for t in passing if t.latency_ms <= fastest * SAME_SPEED]
        chosen = min(quick, key=lambda t: (t.size, -t.parity.mean_cosine))
        why = "the fastest that meets" if len(passing) > 1 else "meets"
        return Choice(
            chosen,
            f"{chosen.recipe.label()} is {why} the target ({evaluator.target.describe()}) with "
            f"nothing kept in fp32 (tried {tried}{skipped})",
        )
    progress("measuring per-node sensitivity")
    ranking = _sensitivity(best.recipe, list(weights)[:MAX_SENSITIVITY_NODES], quantizer, evaluator)
    order = [name for name, _ in ranking]
    total = sum(weights.values())
    cap, kept = 0, 0
    for name in order:
        if kept + weights[name] > MAX_EXCLUDED_WEIGHT_SHARE * total:
            break
        kept += weights[name]
        cap += 1

    def attempt(count: int) -> Trial:
        recipe = replace(best.recipe, exclude=tuple(order[:count]))
        progress(recipe.label())
        return evaluator.evaluate(recipe, quantizer.apply(recipe))

    found: Trial | None = None
    if cap:
        widest = attempt(cap)
        if widest.passes:
            found, low, high = widest, 1, cap - 1
            while low <= high:  # the fewest exclusions that still meet the target
                middle = (low + high) // 2
                trial = attempt(middle)
                if trial.passes:
                    found, high = trial, middle - 1
                else:
                    low = middle + 1
    if found is None:
        _fail(
            f"auto found no int8 recipe meeting the target even with {cap} of the most sensitive "
            f"nodes in fp32 (at most {int(MAX_EXCLUDED_WEIGHT_SHARE * 100)}% of the weights)",
            evaluator,
        )
    assert found is not None
    excluded = ", ".join(found.recipe.exclude)
    reason = (
        f"{best.recipe.label()} was the best plain int8 recipe but missed the target "
        f"({'; '.join(best.unmet)}); keeping the {len(found.recipe.exclude)} most sensitive "
        f"nodes in fp32 ({excluded}) meets it ({evaluator.target.describe()}){skipped}"
    )
    return Choice(found, reason, ranking)


def _sensitivity(
    recipe: Recipe, nodes: list[str], quantizer: Quantizer, evaluator: Evaluator
) -> list[tuple[str, float]]:
    """Each node's loss (1 − mean cosine) when it alone is quantised, most sensitive first."""
    losses: list[tuple[str, float]] = []
    for name in nodes:
        path = quantizer.apply(recipe, only=[name])
        session = validate.open_session(path, evaluator.providers)
        outputs = validate.run(session, evaluator.validation.batches)
        parity = validate.parity(evaluator.reference, outputs, None, evaluator.classifier)
        losses.append((name, 1.0 - parity.mean_cosine + (parity.accuracy_drop or 0.0)))
        shutil.rmtree(path.parent, ignore_errors=True)
    return sorted(losses, key=lambda item: -item[1])


def _fail(message: str, evaluator: Evaluator) -> None:
    best = max(evaluator.trials, key=Trial.score) if evaluator.trials else None
    if best is not None:
        figures = best.parity
        drop = figures.accuracy_drop
        message += (
            f" ({evaluator.target.describe()}); best reached: {best.recipe.label()} with mean "
            f"cosine {figures.mean_cosine:.4f}, min cosine {figures.min_cosine:.4f}"
            + (f", accuracy drop {drop:.4f}" if drop is not None else "")
            + (f", metric {best.metric:.4g}" if best.metric is not None else "")
            + f" ({'; '.join(best.unmet)})"
        )
    raise QualityTargetError(message, best=best, tried=list(evaluator.trials))
