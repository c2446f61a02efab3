"""Load ONNX models safely: only by path, from their own revision directory.

onnxruntime resolves an external-data location against the process's working
directory when a model is loaded from bytes, and follows a hard link out of the
model's folder when it is loaded from a path. So before any model reaches
onnxruntime the agent reads the external-data locations itself (a small
protobuf walk: the device has no ``onnx`` package) and refuses any that is
absolute, contains ``..``, or names a symlink, a hard link (link count > 1) or
anything but a regular file inside the revision directory.
"""

from __future__ import annotations

import mmap
import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from device_agent.errors import UnsafeModelError

# ONNX protobuf field numbers (onnx/onnx.proto3) on the paths that can hold tensors.
_MODEL_GRAPH, _MODEL_TRAINING, _MODEL_FUNCTIONS = 7, 20, 25
_TRAINING_INIT, _TRAINING_ALGO = 1, 2
_GRAPH_NODE, _GRAPH_INIT, _GRAPH_SPARSE_INIT = 1, 5, 15
_FUNCTION_NODE, _FUNCTION_ATTRIBUTE_PROTO = 7, 11
_NODE_ATTRIBUTE = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS = 5, 6, 10, 11
_ATTR_SPARSE, _ATTR_SPARSES = 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_EXTERNAL = 13
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_MAX_DEPTH = 64


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise UnsafeModelError("the model file is not a well-formed ONNX protobuf")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """Yield (field number, start, end) of length-delimited fields; skip the rest."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise UnsafeModelError("the model file is truncated or not ONNX")
            yield number, pos, pos + length
            pos += length
        else:
            raise UnsafeModelError(f"the model file uses protobuf wire type {wire}, not ONNX")
    if pos != end:
        raise UnsafeModelError("the model file is truncated or not ONNX")


def _tensor_locations(buf: memoryview, start: int, end: int) -> Iterator[str]:
    for number, s, e in _fields(buf, start, end):
        if number != _TENSOR_EXTERNAL:
            continue
        key = value = b""
        for n, es, ee in _fields(buf, s, e):
            if n == _ENTRY_KEY:
                key = bytes(buf[es:ee])
            elif n == _ENTRY_VALUE:
                value = bytes(buf[es:ee])
        if key == b"location":
            yield value.decode("utf-8", "replace")


def _graph_locations(buf: memoryview, start: int, end: int, depth: int) -> Iterator[str]:
    if depth > _MAX_DEPTH:
        raise UnsafeModelError("the model nests subgraphs too deeply")
    for number, s, e in _fields(buf, start, end):
        if number == _GRAPH_INIT:
            yield from _tensor_locations(buf, s, e)
        elif number == _GRAPH_SPARSE_INIT:
            yield from _sparse_locations(buf, s, e)
        elif number == _GRAPH_NODE:
            yield from _node_locations(buf, s, e, depth)


def _sparse_locations(buf: memoryview, start: int, end: int) -> Iterator[str]:
    for number, s, e in _fields(buf, start, end):
        if number in (_SPARSE_VALUES, _SPARSE_INDICES):
            yield from _tensor_locations(buf, s, e)


def _attribute_locations(buf: memoryview, start: int, end: int, depth: int) -> Iterator[str]:
    for an, as_, ae in _fields(buf, start, end):
        if an in (_ATTR_T, _ATTR_TENSORS):
            yield from _tensor_locations(buf, as_, ae)
        elif an in (_ATTR_SPARSE, _ATTR_SPARSES):
            yield from _sparse_locations(buf, as_, ae)
        elif an in (_ATTR_G, _ATTR_GRAPHS):
            yield from _graph_locations(buf, as_, ae, depth + 1)


def _node_locations(buf: memoryview, start: int, end: int, depth: int) -> Iterator[str]:
    for number, s, e in _fields(buf, start, end):
        if number == _NODE_ATTRIBUTE:
            yield from _attribute_locations(buf, s, e, depth)


def external_data_locations_in(buf: memoryview) -> list[str]:
    """Every external-data ``location`` a serialized model names, read without ``onnx``.

    The walk reaches every place onnxruntime reads a tensor from: graph and
    subgraph initializers (sparse ones too), node attributes, local functions'
    nodes and default attributes, and training graphs.
    """
    found: list[str] = []
    for number, s, e in _fields(buf, 0, len(buf)):
        if number == _MODEL_GRAPH:
            found.extend(_graph_locations(buf, s, e, 0))
        elif number == _MODEL_FUNCTIONS:
            for fn, fs, fe in _fields(buf, s, e):
                if fn == _FUNCTION_NODE:
                    found.extend(_node_locations(buf, fs, fe, 0))
                elif fn == _FUNCTION_ATTRIBUTE_PROTO:  # default values, read too
                    found.extend(_attribute_locations(buf, fs, fe, 0))
        elif number == _MODEL_TRAINING:
            for tn, ts, te in _fields(buf, s, e):
                if tn in (_TRAINING_INIT, _TRAINING_ALGO):
                    found.extend(_graph_locations(buf, ts, te, 0))
    return found


def external_data_locations(model_path: Path) -> list[str]:
    """Every external-data ``location`` a model file names (:func:`external_data_locations_in`)."""
    with open(model_path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise UnsafeModelError(f"{model_path.name} is empty")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            try:
                return external_data_locations_in(buf)
            finally:
                buf.release()


def _check_plain_file(path: Path, what: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise UnsafeModelError(f"{what} {path.name} is missing") from None
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeModelError(f"{what} {path.name} is a symbolic link; refusing to load it")
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeModelError(f"{what} {path.name} is not a regular file; refusing to load it")
    if st.st_nlink != 1:
        raise UnsafeModelError(
            f"{what} {path.name} is a hard link ({st.st_nlink} names); refusing to load it"
        )


def check_location(revision_dir: Path, location: str) -> Path:
    """Resolve one external-data location inside ``revision_dir`` or refuse it."""
    if not location or "\x00" in location:
        raise UnsafeModelError("an external-data location is empty or holds a NUL byte")
    posix, windows = PurePosixPath(location), PureWindowsPath(location)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or location[0] in "/\\":
        raise UnsafeModelError(f"external-data location {location!r} is absolute; refusing it")
    if ".." in posix.parts or ".." in windows.parts:
        raise UnsafeModelError(f"external-data location {location!r} contains '..'; refusing it")
    current = revision_dir
    parts = posix.parts
    for part in parts[:-1]:
        current = current / part
        mode = os.lstat(current).st_mode if current.exists() or current.is_symlink() else 0
        if not stat.S_ISDIR(mode):
            raise UnsafeModelError(
                f"external-data location {location!r} passes through a link or non-folder"
            )
    target = revision_dir.joinpath(*parts)
    _check_plain_file(target, "external-data file")
    if not str(target.resolve()).startswith(str(revision_dir.resolve()) + os.sep):
        raise UnsafeModelError(f"external-data location {location!r} leaves the revision folder")
    return target


def check_model(revision_dir: Path, model_relpath: str) -> Path:
    """Check a model file and all its external data; return the model's path."""
    model_path = check_location(revision_dir, model_relpath)
    for location in external_data_locations(model_path):
        check_location(model_path.parent, location)
    return model_path


def open_session(revision_dir: Path, model_relpath: str, providers: list[str] | None = None) -> Any:
    """Check then load a model by path with onnxruntime; never from bytes."""
    import onnxruntime as ort  # heavy: imported only when a model is loaded

    model_path = check_model(revision_dir, model_relpath)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        str(model_path), options, providers=providers or ["CPUExecutionProvider"]
    )
