"""Strip build-machine details from an ONNX model before it is packed.

The dynamo exporter writes node metadata holding absolute source paths and
stack traces of the machine that built the model (about 0.5 MB on a small
transformer), and converters put free text in ``doc_string`` fields. None of
it is needed to run the model and all of it leaks the builder's file system,
so the bundle never carries it.
"""

from __future__ import annotations

import re

import onnx

# Model-level metadata is kept unless its value looks like a path or a trace.
_LEAKY = re.compile(r"(^|[\s\"'(=])(/[^\s/]+){2,}|[A-Za-z]:\\|Traceback|File \"")


def sanitize(model: onnx.ModelProto) -> int:
    """Remove node metadata and doc strings everywhere in the model; return how many fields."""
    removed = 0
    if model.doc_string:
        model.doc_string = ""
        removed += 1
    kept = [p for p in model.metadata_props if not _LEAKY.search(p.value)]
    removed += len(model.metadata_props) - len(kept)
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    removed += _graph(model.graph)
    for function in model.functions:
        removed += _strip(function)
        for node in function.node:
            removed += _node(node)
    return removed


def _graph(graph: onnx.GraphProto) -> int:
    removed = _strip(graph)
    for value in (*graph.input, *graph.output, *graph.value_info):
        removed += _strip(value)
    for tensor in graph.initializer:
        removed += _strip(tensor)
    for node in graph.node:
        removed += _node(node)
    return removed


def _node(node: onnx.NodeProto) -> int:
    removed = _strip(node)
    for attribute in node.attribute:
        if attribute.doc_string:
            attribute.doc_string = ""
            removed += 1
        if attribute.HasField("g"):
            removed += _graph(attribute.g)
        for sub in attribute.graphs:
            removed += _graph(sub)
    return removed


def _strip(
    item: onnx.NodeProto
    | onnx.GraphProto
    | onnx.FunctionProto
    | onnx.ValueInfoProto
    | onnx.TensorProto,
) -> int:
    removed = 0
    if item.doc_string:
        item.doc_string = ""
        removed += 1
    props = getattr(item, "metadata_props", None)
    if props is not None and len(props):
        removed += len(props)
        del props[:]
    return removed
