"""``build()``: one call from a trained model to verified bundles, one per hardware profile.

All work happens in a private staging directory; OUTDIR receives the bundles
and the report only once every variant has been converted, quantised,
validated and packed, so a failed build leaves nothing behind in it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgepack.build import healthset, samples, validate
from edgepack.build._util import sha256_tree, tree_size
from edgepack.build.convert import Converted, TorchOptions, as_float32, convert
from edgepack.build.quantize import (
    RECIPES,
    Evaluator,
    Metric,
    Quantizer,
    Recipe,
    Target,
    device_int8_is_exact,
)
from edgepack.build.report import BuildReport, VariantReport
from edgepack.build.samples import RawSamples, SampleSet
from edgepack.build.sanitize import sanitize
from edgepack.build.search import Choice, choose
from edgepack.errors import InvalidInputError
from edgepack.hw import HardwareProfile, load_profile

Progress = Callable[[str], None]
LARGE_MODEL = 1536 * 2**20


@dataclass
class Variant:
    """A finished model directory for one profile and the metadata ``pack`` records."""

    profile: HardwareProfile
    model_dir: Path
    model_info: dict[str, Any]
    quantization: dict[str, Any]
    provenance: dict[str, Any]
    health: dict[str, Any]
    report: VariantReport
    monitoring: dict[str, Any] | None = None


@dataclass
class Staged:
    """Every variant of a build, before packing."""

    report: BuildReport
    fp32: Path
    variants: list[Variant] = field(default_factory=list)


@dataclass
class BuildResult:
    """What :func:`build` wrote into OUTDIR."""

    bundles: list[Path]
    report_path: Path
    report: BuildReport


def build(
    model: Any,
    *,
    name: str,
    version: str,
    hw: str | Sequence[str],
    out_dir: str | Path,
    recipients: Sequence[Any],
    signer: Any,
    quantize: str | None = None,
    min_cosine: float | None = None,
    max_accuracy_drop: float | None = None,
    metric: Metric | None = None,
    min_metric: float | None = None,
    calibration: RawSamples | None = None,
    validation: RawSamples | None = None,
    labels: Any = None,
    example_inputs: Sequence[Any] = (),
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    allow_pickle: bool = False,
    progress: Progress | None = None,
    monitoring: bool = True,
    monitor_thresholds: Mapping[str, float] | None = None,
) -> BuildResult:
    """Convert, quantise, validate and pack ``model`` for each profile in ``hw``.

    ``model`` is a path (.onnx, .pt2, or with ``allow_pickle`` a pickle/joblib
    file), an ``onnx.ModelProto``, a torch ``nn.Module``/``ExportedProgram``
    (with ``example_inputs`` and optional ``dynamic_axes``) or a fitted
    scikit-learn estimator. ``metric(reference_outputs, candidate_outputs)``
    with ``min_metric`` adds a quality target of your own. Each bundle carries a
    monitoring reference of the final model (``monitor_thresholds`` override the
    producer's default thresholds) unless ``monitoring`` is False.
    """
    from edgepack.bundle import pack
    from edgepack.bundle.metadata import check_name, check_version

    check_name(name)
    check_version(version)
    if not recipients:
        raise InvalidInputError("a build needs at least one recipient", hint="pass --recipient PUB")
    out = Path(out_dir)
    note = progress or (lambda _: None)
    with tempfile.TemporaryDirectory(prefix="edgepack-build-") as scratch:
        work = Path(scratch)
        staged = build_variants(
            model,
            hw=hw,
            workdir=work,
            quantize=quantize,
            min_cosine=min_cosine,
            max_accuracy_drop=max_accuracy_drop,
            metric=metric,
            min_metric=min_metric,
            calibration=calibration,
            validation=validation,
            labels=labels,
            example_inputs=example_inputs,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            allow_pickle=allow_pickle,
            progress=progress,
            monitoring=monitoring,
            monitor_thresholds=monitor_thresholds,
        )
        staged.report.name, staged.report.version = name, version
        bundles_dir = work / "bundles"
        bundles_dir.mkdir()
        written: list[Path] = []
        for variant in staged.variants:
            note(f"packing {variant.profile.name}")
            result = pack(
                variant.model_dir,
                bundles_dir,
                name=name,
                version=version,
                recipients=recipients,
                signer=signer,
                profile=variant.profile.name,
                architectures=[variant.profile.architecture],
                model_info=variant.model_info,
                quantization=variant.quantization,
                provenance=variant.provenance,
                health=variant.health,
                monitoring=variant.monitoring,
            )
            variant.report.bundle = result.path.name
            written.append(result.path)
        report_file = bundles_dir / f"{name}-{version}.build-report.json"
        report_file.write_text(json.dumps(staged.report.as_dict(), indent=2, sort_keys=True) + "\n")
        moved = _publish([*written, report_file], out)
    return BuildResult(moved[:-1], moved[-1], staged.report)


def _publish(files: list[Path], out: Path) -> list[Path]:
    """Move finished files into OUTDIR; on any failure remove what was already moved."""
    out.mkdir(parents=True, exist_ok=True)
    moved: list[Path] = []
    try:
        for source in files:
            target = out / source.name
            partial = out / f".{source.name}.partial"
            shutil.copyfile(source, partial)
            os.replace(partial, target)
            moved.append(target)
    except OSError as exc:
        for path in [*moved, *(out / f".{f.name}.partial" for f in files)]:
            path.unlink(missing_ok=True)
        raise InvalidInputError(f"cannot write into {out}: {exc}") from exc
    return moved


def build_variants(
    model: Any,
    *,
    hw: str | Sequence[str],
    workdir: Path,
    quantize: str | None = None,
    min_cosine: float | None = None,
    max_accuracy_drop: float | None = None,
    metric: Metric | None = None,
    min_metric: float | None = None,
    calibration: RawSamples | None = None,
    validation: RawSamples | None = None,
    labels: Any = None,
    example_inputs: Sequence[Any] = (),
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    allow_pickle: bool = False,
    progress: Progress | None = None,
    monitoring: bool = True,
    monitor_thresholds: Mapping[str, float] | None = None,
) -> Staged:
    """Build a finished model directory per profile under ``workdir`` (no packing)."""
    workdir = Path(workdir).resolve()  # tools run with another working directory
    note = progress or (lambda _: None)
    thresholds = check_thresholds(monitor_thresholds or {})
    profiles = [load_profile(n) for n in ([hw] if isinstance(hw, str) else list(hw))]
    if not profiles:
        raise InvalidInputError("no hardware profile given", hint="pass --hw PROFILE")
    if quantize is not None and quantize not in RECIPES:
        raise InvalidInputError(
            f"unknown recipe {quantize!r}", hint=f"use one of {', '.join(RECIPES)}"
        )
    if min_metric is not None and metric is None:
        raise InvalidInputError("min_metric needs a metric function")
    raw_validation = samples.read_raw(validation, "validation") if validation is not None else None
    raw_calibration = (
        samples.read_raw(calibration, "calibration") if calibration is not None else None
    )

    note("converting to ONNX")
    first = raw_validation or raw_calibration
    converted = convert(
        model,
        workdir,
        allow_pickle=allow_pickle,
        torch_options=TorchOptions(tuple(example_inputs), input_names, output_names, dynamic_axes),
        sample=as_float32(first[0][0]) if first else None,
    )
    fp32 = converted.path
    note("checking the fp32 model")
    validate.check_model(fp32)
    inputs, outputs = validate.model_io(fp32)
    if not converted.source_digest:
        converted.source_digest = sha256_tree(_model_files(fp32), fp32.parent)
    label_array = None if labels is None else np.asarray(labels)
    valid_set = _bind(raw_validation, inputs, "validation", label_array)
    calib_set = _bind(raw_calibration, inputs, "calibration", None)
    if valid_set is None:
        valid_set = calib_set or _example_set(converted, inputs) or samples.synthetic(inputs)
    classifier = converted.classifier or any(o.dtype.startswith("int") for o in outputs)
    classifier = classifier or valid_set.labels is not None

    fp32_session = validate.open_session(fp32, ["CPUExecutionProvider"])
    reference = validate.run(fp32_session, valid_set.batches)
    conversion = _conversion_parity(converted, valid_set, reference, classifier)
    fp32_latency = validate.latency_ms(fp32_session, valid_set.batches[0])
    del fp32_session
    report = BuildReport(
        name="",
        version="",
        source=str(model) if isinstance(model, (str, Path)) else type(model).__name__,
        converter=converted.converter,
        provenance=_provenance(converted),
        inputs=[i.as_dict() for i in inputs],
        outputs=[o.as_dict() for o in outputs],
        validation={
            "origin": valid_set.origin,
            "samples": valid_set.count,
            "batches": len(valid_set.batches),
            "labels": valid_set.labels is not None,
        },
        conversion_quality=conversion.as_dict() if conversion else None,
        notes=list(converted.notes),
    )
    # The reference profiles real data only: never the example inputs or invented noise.
    monitor_set = (valid_set if raw_validation is not None else calib_set) if monitoring else None
    if monitoring and monitor_set is None:
        report.notes.append(
            "no monitoring reference: no --validation or --calibration data to profile"
        )
    staged = Staged(report, fp32)
    quantizers: dict[bool, Quantizer] = {}
    for profile in profiles:
        kind = quantize or profile.quantization.recipe
        calib = calib_set
        if kind == "static" and calib is None:
            calib = valid_set
            report.notes.append("static calibration used the validation data (no --calibration)")
        quantizer = quantizers.setdefault(
            calib is not None, Quantizer(fp32, workdir / f"q{len(quantizers)}", calib)
        )
        quantizer.workdir.mkdir(exist_ok=True)
        target = _target(profile, min_cosine, max_accuracy_drop, metric, min_metric)
        q = profile.quantization
        exact = device_int8_is_exact(profile.architecture, profile.cpu_features, q.reduce_range)
        evaluator = Evaluator(
            valid_set, reference, classifier, profile.execution_providers, target, exact
        )
        note(f"{profile.name}: quantising ({kind})")
        base = Recipe(kind, q.per_channel, q.weight_type, q.activation_type, q.reduce_range)
        choice = choose(kind, base, quantizer, evaluator, _prefixed(note, profile.name))
        note(f"{profile.name}: validating")
        variant_dir = workdir / "variants" / profile.name
        staged.variants.append(
            _finish(
                profile, choice, evaluator, variant_dir, valid_set, fp32, fp32_latency, converted
            )
        )
        if monitor_set is not None:
            profile_doc, left_out = _reference(
                variant_dir / "model.onnx", profile, monitor_set, thresholds
            )
            staged.variants[-1].monitoring = profile_doc
            staged.variants[-1].report.notes.extend(left_out)
        staged.variants[-1].report.notes.extend(quantizer.notes)
        report.variants.append(staged.variants[-1].report)
    return staged


def check_thresholds(thresholds: Mapping[str, float]) -> dict[str, float]:
    """Monitoring threshold overrides: known keys, finite positive numbers, an integer window."""
    from edgepack.monitoring import DEFAULT_THRESHOLDS

    checked: dict[str, float] = {}
    for key, value in thresholds.items():
        if key not in DEFAULT_THRESHOLDS:
            raise BadMonitorThresholdError(
                f"unknown monitoring threshold {key!r}",
                hint=f"use one of {', '.join(sorted(DEFAULT_THRESHOLDS))}",
            )
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number) or number <= 0 or (key == "window" and number % 1):
            raise BadMonitorThresholdError(
                f"monitoring threshold {key} must be a positive "
                f"{'whole number' if key == 'window' else 'number'}, not {value!r}"
            )
        checked[key] = number
    return checked


def parse_thresholds(pairs: Sequence[str]) -> dict[str, float]:
    """``KEY=VALUE`` strings (``--monitor-threshold``) as checked overrides."""
    parsed: dict[str, float] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        try:
            if not sep:
                raise ValueError
            parsed[key.strip()] = float(text)
        except ValueError:
            raise BadMonitorThresholdError(
                f"--monitor-threshold {pair!r} is not KEY=NUMBER", hint="e.g. drift_psi=0.3"
            ) from None
    return check_thresholds(parsed)


class BadMonitorThresholdError(InvalidInputError):
    """A monitoring threshold override is not usable: bad usage, exit code 2 like click's."""

    exit_code = 2


def _reference(
    model_path: Path, profile: HardwareProfile, data: SampleSet, thresholds: Mapping[str, float]
) -> tuple[dict[str, Any] | None, list[str]]:
    """The monitoring reference of the final model on ``data`` (its inputs, all its outputs),
    or None; and notes on what it leaves out."""
    from edgepack import monitoring

    session = validate.open_session(model_path, profile.execution_providers)
    names = [o.name for o in session.get_outputs()]
    runs = validate.run(session, data.batches)
    notes: list[str] = []
    inputs: dict[str, np.ndarray] = {}
    for name in data.batches[0]:
        stacked = _stack([b[name] for b in data.batches])
        if stacked is None:
            return None, [f"no monitoring reference: the batches of input {name!r} differ in shape"]
        inputs[name] = stacked
    outputs: dict[str, np.ndarray] = {}
    for index, name in enumerate(names):
        stacked = _stack([run[index] for run in runs], ids=False)
        if stacked is None:
            notes.append(f"monitoring: output {name!r} not profiled (its batches differ in shape)")
        else:
            outputs[name] = stacked
    try:
        return monitoring.build_reference(inputs, outputs, thresholds), notes
    except InvalidInputError as exc:
        return None, [f"no monitoring reference: {exc.message}"]


def _stack(arrays: list[np.ndarray], ids: bool = True) -> np.ndarray | None:
    """The batches as one array of rows; integer ids of varying lengths (token sequences) as
    one column of all their values, which is what an ``ids`` feature's histogram counts;
    None for other arrays whose batches differ in shape."""
    try:
        return np.concatenate(arrays)
    except ValueError:
        if ids and all(a.dtype.kind in "iu" for a in arrays):
            return np.concatenate([a.reshape(-1) for a in arrays])[:, None]
        return None


def _prefixed(note: Progress, prefix: str) -> Progress:
    def tell(step: str) -> None:
        note(f"{prefix}: {step}")

    return tell


def _bind(raw: Any, inputs: list[samples.TensorSpec], what: str, labels: Any) -> SampleSet | None:
    if raw is None:
        return None
    batches, file_labels, origin = raw
    return samples.bind(
        batches, labels if labels is not None else file_labels, origin, inputs, what
    )


def _example_set(converted: Converted, inputs: list[samples.TensorSpec]) -> SampleSet | None:
    if converted.example is None:
        return None
    return samples.bind([converted.example], None, "the example inputs", inputs, "example")


def _target(
    profile: HardwareProfile,
    min_cosine: float | None,
    max_accuracy_drop: float | None,
    metric: Metric | None,
    min_metric: float | None,
) -> Target:
    """The user's targets; the profile's ``min_cosine`` when the user gave none."""
    if min_cosine is None and max_accuracy_drop is None and metric is None:
        min_cosine = profile.quantization.min_cosine
    for label, value in (("min_cosine", min_cosine), ("max_accuracy_drop", max_accuracy_drop)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise InvalidInputError(f"{label} must lie between 0 and 1, not {value}")
    return Target(min_cosine, max_accuracy_drop, metric, min_metric)


def _conversion_parity(
    converted: Converted, valid: SampleSet, reference: validate.Outputs, classifier: bool
) -> validate.Parity | None:
    """Check the fp32 ONNX against the source model (torch, scikit-learn) on the samples."""
    if converted.reference is None:
        return None
    source = [converted.reference(batch) for batch in valid.batches]
    result = validate.parity(source, reference, valid.labels, classifier)
    agreement = result.top1_agreement if result.top1_agreement is not None else 1.0
    if result.mean_cosine < 0.999 or agreement < 0.99:
        raise InvalidInputError(
            f"the ONNX conversion ({converted.converter}) disagrees with the source model: mean "
            f"cosine {result.mean_cosine:.5f}, top-1 agreement {agreement:.4f}",
            hint="report this model to the converter's authors, or convert it to ONNX yourself",
        )
    return result


def _provenance(converted: Converted) -> dict[str, Any]:
    return {
        "source_digest": converted.source_digest,
        "converter": converted.converter,
        "tools": converted.tools,
    }


def _model_files(path: Path) -> list[Path]:
    return [p for p in path.parent.rglob("*") if p.is_file()]


def _finish(
    profile: HardwareProfile,
    choice: Choice,
    evaluator: Evaluator,
    variant_dir: Path,
    valid: SampleSet,
    fp32: Path,
    fp32_latency: float,
    converted: Converted,
) -> Variant:
    """Write the final model directory, validate it on the profile's runtime, record health."""
    trial = choice.trial
    model_path = finalize(trial.path, variant_dir)
    validate.check_model(model_path)
    before = validate.rss_mb()
    session = validate.open_session(model_path, profile.execution_providers)
    validate.run(session, valid.batches[:1])
    memory = max(0.0, validate.rss_mb() - before)
    latency = validate.latency_ms(session, valid.batches[0])
    error = trial.parity
    if evaluator.exact_int8:
        # The golden outputs are the device's; the tolerances also cover this machine's
        # kernels, whose int16 saturation (x86 without VNNI) may stray further from fp32.
        here = validate.parity(
            evaluator.reference, validate.run(session, valid.batches), None, evaluator.classifier
        )
        error = replace(
            error,
            max_abs_diff=max(error.max_abs_diff, here.max_abs_diff),
            top1_agreement=_lowest(error.top1_agreement, here.top1_agreement),
        )
        session = evaluator.session(model_path)
    health = healthset.write(
        variant_dir,
        session,
        samples.head(valid, healthset.ROWS_PER_CASE, healthset.CASES),
        error,
        profile,
    )
    inputs, outputs = validate.model_io(model_path)
    recipe: Recipe = trial.recipe
    quality = trial.parity.as_dict()
    quantization = {
        "recipe": recipe.kind,
        "parameters": recipe.parameters(),
        "excluded_nodes": list(recipe.exclude),
        "quality": quality,
        "target": evaluator.target.describe(),
        "reason": choice.reason,
    }
    report = VariantReport(
        profile=profile.name,
        architecture=profile.architecture,
        recipe=recipe.kind,
        recipe_label=recipe.label(),
        parameters=recipe.parameters(),
        excluded_nodes=list(recipe.exclude),
        reason=choice.reason,
        target=evaluator.target.describe(),
        quality=quality,
        size_bytes=tree_size(variant_dir) - (variant_dir / healthset.FILE).stat().st_size,
        fp32_size_bytes=tree_size(fp32.parent),
        latency_ms=round(latency, 3),
        fp32_latency_ms=round(fp32_latency, 3),
        memory_mb=round(memory, 1),
        health=health,
        tried=[t.summary() for t in evaluator.trials],
        sensitivity=[{"node": n, "loss": round(loss, 6)} for n, loss in choice.sensitivity],
    )
    missing = [p for p in profile.execution_providers if p not in validate.available_providers()]
    if missing:
        report.notes.append(
            f"{', '.join(missing)} not available on this machine; validated on the CPU provider"
        )
    return Variant(
        profile=profile,
        model_dir=variant_dir,
        model_info={
            "path": "model.onnx",
            "inputs": [i.as_dict() for i in inputs],
            "outputs": [o.as_dict() for o in outputs],
        },
        quantization=quantization,
        provenance=_provenance(converted),
        health=health,
        report=report,
    )


def _lowest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def finalize(source: Path, target_dir: Path) -> Path:
    """Copy a candidate into a clean model directory, stripped of build-machine details.

    Weights go to one ``model.onnx.data`` side file only when the model is too
    big for a single protobuf file.
    """
    model = onnx.load(str(source))
    sanitize(model)
    target_dir.mkdir(parents=True)
    target = target_dir / "model.onnx"
    large = sum(len(t.raw_data) for t in model.graph.initializer) > LARGE_MODEL
    onnx.save_model(
        model,
        str(target),
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,
    )
    return target
