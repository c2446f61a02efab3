"""Export torch models to ONNX with both exporters and keep the first one that is right.

"Right" means: onnxruntime reproduces torch's outputs on the example inputs
and on inputs grown by one along every symbolic axis of the exported model
(the TorchScript exporter can declare an axis dynamic yet bake the example's
size into a Reshape). Imported only when a torch model is being built.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgepack.build._util import private_cwd, quiet, tool_versions
from edgepack.build.convert import TORCH_HINT, Converted, TorchOptions, signature_names
from edgepack.build.samples import Array, Feed, numpy_dtype
from edgepack.errors import InvalidInputError

try:
    import torch
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise InvalidInputError("PyTorch is not installed", hint=TORCH_HINT) from _exc

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Operators as torch names them (aten::add, aten.add.Tensor, mylib::op); not C++ namespaces.
_OPERATOR = re.compile(
    r"(torch\.ops\.[\w.]+|\b(?!onnxruntime|std|c10)[a-z_]\w*::[\w.]+|aten\.[\w.]+)"
)


def convert(model: Any, out_dir: Path, options: TorchOptions, sample: Feed | None) -> Converted:
    """Export an ``nn.Module`` or ``ExportedProgram`` to fp32 ONNX under ``out_dir``."""
    program = isinstance(model, torch.export.ExportedProgram)
    if program:
        module = model.module()
        args = tuple(options.example_inputs) or tuple(model.example_inputs[0])
    elif isinstance(model, torch.nn.Module):
        module = model.eval()
        args = tuple(options.example_inputs)
        if not args and sample is not None:
            args = tuple(torch.from_numpy(a) for a in sample.values())
    else:
        raise InvalidInputError(f"cannot export a {type(model).__name__} to ONNX")
    if not args:
        raise InvalidInputError(
            "a torch model needs example inputs to be exported",
            hint="pass example_inputs=(tensor, ...) or --validation DATA",
        )
    args = tuple(torch.as_tensor(a) if isinstance(a, np.ndarray) else a for a in args)
    reference = _reference(module)
    input_names = list(options.input_names or signature_names(module.forward, len(args)))
    example = {name: a.detach().cpu().numpy() for name, a in zip(input_names, args, strict=False)}
    expected = reference(example)
    output_names = list(options.output_names or [f"output_{i}" for i in range(len(expected))])
    failures: list[tuple[str, str]] = []
    operators: list[str] = []
    for exporter in ("dynamo",) if program else ("dynamo", "torchscript"):
        target = out_dir / exporter / "model.onnx"
        target.parent.mkdir()
        dynamo = exporter == "dynamo"
        try:
            with private_cwd(out_dir.parent), quiet():
                torch.onnx.export(
                    model if program else module,
                    () if program else args,
                    str(target),
                    dynamo=dynamo,
                    input_names=input_names,
                    # The dynamo exporter may already use a wanted output name for an
                    # intermediate value (an invalid model); outputs are renamed afterwards.
                    output_names=None if dynamo else output_names,
                    dynamic_axes=None
                    if program
                    else _axes(options.dynamic_axes, dynamo, input_names),
                    external_data=dynamo,
                )
            if dynamo:
                _rename_outputs(target, output_names)
        except Exception as exc:
            text = _describe(exc)
            failures.append((exporter, text))
            operators += [m.group(1) for m in _OPERATOR.finditer(text)]
            continue
        problem = _check(target, reference, example, options.dynamic_axes)
        if problem:
            failures.append((exporter, problem))
            continue
        notes = [f"{name} exporter: {why}" for name, why in failures]
        return Converted(
            target,
            f"torch.onnx ({exporter})",
            "",
            tool_versions("torch", "onnxscript"),
            reference=reference,
            example=example,
            notes=notes,
        )
    detail = "; ".join(f"{name}: {why}" for name, why in failures)
    what = f"operator {operators[0]} is not supported" if operators else "the export failed"
    raise InvalidInputError(
        f"cannot export the torch model to ONNX: {what} by either exporter ({detail})",
        hint="replace the operator, or export to ONNX yourself and build the .onnx file",
    )


def _axes(declared: Any, dynamo: bool, inputs: Sequence[str]) -> Any:
    """The dynamo exporter derives output shapes itself and knows inputs only by name."""
    if not declared or not dynamo:
        return declared
    return {name: axes for name, axes in declared.items() if name in inputs} or None


def _rename_outputs(path: Path, names: Sequence[str]) -> None:
    """Give the graph outputs the wanted names, moving any intermediate value out of the way."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    if len(names) != len(graph.output):
        return
    changed = False
    for output, wanted in zip(graph.output, names, strict=True):
        current = output.name
        if current == wanted:
            continue
        _rename_value(graph, wanted, f"{wanted}__inner")
        _rename_value(graph, current, wanted)
        changed = True
    if changed:
        onnx.save_model(model, str(path))


def _rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
        node.output[:] = [new if o == old else o for o in node.output]
    for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        if value.name == old:
            value.name = new


def _reference(module: Any) -> Any:
    def run(feed: Feed) -> list[Array]:
        with torch.no_grad():
            result = module(*(torch.from_numpy(np.ascontiguousarray(a)) for a in feed.values()))
        return [t.detach().cpu().numpy() for t in _flatten(result)]

    return run


def _flatten(result: Any) -> list[Any]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, dict):
        return [t for v in result.values() for t in _flatten(v)]
    if isinstance(result, (list, tuple)):
        return [t for v in result for t in _flatten(v)]
    raise InvalidInputError(f"the torch model returned a {type(result).__name__}, not tensors")


def _check(target: Path, reference: Any, example: Feed, declared: Any) -> str | None:
    """Why an export is wrong, or None when onnxruntime matches torch on all probe shapes."""
    import onnxruntime as ort

    model = onnx.load(str(target), load_external_data=False)
    inputs = [
        i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}
    ]
    for spec in inputs:
        if spec.name not in example:
            return f"the export has an input {spec.name!r} the example does not"
        want = numpy_dtype(spec.type.tensor_type.elem_type)
        if want != example[spec.name].dtype.name:
            return f"input {spec.name!r} became {want}"
    for name, axes in (declared or {}).items():
        spec = next((i for i in inputs if i.name == name), None)
        for axis in axes:
            if spec is not None and spec.type.tensor_type.shape.dim[axis].HasField("dim_value"):
                return f"axis {axis} of {name!r} was declared dynamic but exported fixed"
    try:
        session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    except Exception as exc:
        return f"onnxruntime cannot load the export: {_describe(exc)}"
    probes = [example, _grown(example, inputs)]
    for probe in probes:
        try:
            got = session.run(None, probe)
        except Exception as exc:
            return f"onnxruntime fails on inputs of shape {_shapes(probe)}: {_describe(exc)}"
        want = reference(probe)
        problem = _compare(want, got)
        if problem:
            return f"outputs differ from torch on inputs of shape {_shapes(probe)}: {problem}"
    return None


def _grown(example: Feed, inputs: Sequence[onnx.ValueInfoProto]) -> Feed:
    """The example grown by one along every symbolic axis (repeating the first slice)."""
    grown = dict(example)
    for spec in inputs:
        array = grown[spec.name]
        for axis, dim in enumerate(spec.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value") and axis < array.ndim:
                first = np.take(array, [0], axis=axis)
                array = np.concatenate([array, first], axis=axis)
        grown[spec.name] = array
    return grown


def _compare(want: list[Array], got: list[Any]) -> str | None:
    if len(want) != len(got):
        return f"{len(got)} outputs instead of {len(want)}"
    for index, (a, b) in enumerate(zip(want, got, strict=False)):
        b = np.asarray(b)
        if a.shape != b.shape:
            return f"output {index} has shape {list(b.shape)} instead of {list(a.shape)}"
        if a.dtype.kind in "fc":
            scale = max(1.0, float(np.max(np.abs(a))) if a.size else 1.0)
            diff = float(np.max(np.abs(a - b))) if a.size else 0.0
            if not np.isfinite(diff) or diff > 1e-3 * scale:
                return f"output {index} differs by up to {diff:.3g}"
        elif not np.array_equal(a, b):
            return f"output {index} differs"
    return None


def _shapes(feed: Feed) -> str:
    return ", ".join(f"{k}{list(v.shape)}" for k, v in feed.items())


def _describe(exc: BaseException) -> str:
    text = " ".join(_ANSI.sub("", str(exc)).split())
    match = _OPERATOR.search(text)
    head = text[:240]
    if match and match.group(1) not in head:
        head += f" … {match.group(1)}"
    return head or type(exc).__name__
