"""Load an ONNX model from decrypted payload files in memory, never from a plaintext file.

An encrypted revision (``device_agent.atrest``) is decrypted into one buffer; its
files are views into it. This module hands onnxruntime the model bytes and every
external-data file the model names as in-memory buffers
(``SessionOptions.add_external_initializers_from_files_in_memory``), so no
plaintext ever touches the disk.

What onnxruntime 1.32 does, measured (tests/agent/test_memload.py):

* A model loaded from bytes has no folder: an external-data location it names
  and is not given in memory is read **from the process's working directory**.
  So every location is checked to name a payload file in the model's folder and
  all of them are given in memory; and the table of in-memory files is always
  set (with a name no location can have when the model names none), because
  once it is set onnxruntime refuses any location missing from it instead of
  opening a file.
* The table covers only the main graph's initializers and its ``Constant``
  nodes. A tensor with external data anywhere else — a subgraph (``If``,
  ``Loop``, ``Scan``), a sparse initializer, another node's attribute (e.g.
  ``ConstantOfShape``), a local function — is still read from the working
  directory even when its file is in the table; ``add_external_initializers``
  cannot replace such tensors either. Those models are refused here (repack
  with the tensor stored inside the model, or install the revision ``plain``).
* onnxruntime copies the external data during session creation: the buffers
  may be wiped as soon as :func:`open_session_from_memory` returns, and loading
  peaks at twice the external data (the decrypted buffer plus onnxruntime's
  copy), then settles at one copy once the caller releases its buffer. The model
  bytes themselves are passed as a ``bytes`` copy (onnxruntime's Python binding
  accepts nothing else), so a model holding its weights inside peaks at three
  times its size while loading. The binding would keep that copy as long as
  the session lives, to re-create the session; the session is made one that
  is never re-created, and the copy is dropped.

numpy and onnxruntime are imported only inside :func:`open_session_from_memory`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from device_agent import safeload
from device_agent.errors import UnsafeModelError

# ONNX protobuf field numbers (onnx/onnx.proto3) for the main graph's Constant nodes.
_MODEL_GRAPH, _GRAPH_NODE, _GRAPH_INIT = 7, 1, 5
_NODE_OP_TYPE, _NODE_ATTRIBUTE, _NODE_DOMAIN = 4, 5, 7
_ATTR_NAME, _ATTR_T = 1, 5
_ONNX_DOMAINS = (b"", b"ai.onnx")
# The in-memory table's entry when the model names no external data: a NUL, so no
# location (all are refused with a NUL) can match it.
_NO_FILE = "\x00edgepack-no-external-data"

_REPACK = (
    "store that tensor inside the model file (or in the main graph's initializers), "
    "or install this model with at_rest plain"
)


def _check_name(location: str, what: str) -> None:
    """Refuse a path that is not plainly relative: absolute, drive, backslash, NUL, '..'."""
    if not location or "\x00" in location:
        raise UnsafeModelError(f"{what} is empty or holds a NUL byte; refusing the model")
    if "\\" in location:
        raise UnsafeModelError(f"{what} {location!r} holds a backslash; refusing it")
    windows = PureWindowsPath(location)
    if location.startswith("/") or windows.is_absolute() or windows.drive or ":" in location:
        raise UnsafeModelError(f"{what} {location!r} is absolute or names a drive; refusing it")
    if ".." in PurePosixPath(location).parts:
        raise UnsafeModelError(f"{what} {location!r} contains '..'; refusing it")


def _node_constant_locations(buf: memoryview, start: int, end: int) -> Iterator[str]:
    """The external-data locations of a ``Constant`` node's ``value`` tensor."""
    op_type = domain = b""
    attributes: list[tuple[int, int]] = []
    for number, s, e in safeload._fields(buf, start, end):
        if number == _NODE_OP_TYPE:
            op_type = bytes(buf[s:e])
        elif number == _NODE_DOMAIN:
            domain = bytes(buf[s:e])
        elif number == _NODE_ATTRIBUTE:
            attributes.append((s, e))
    if op_type != b"Constant" or domain not in _ONNX_DOMAINS:
        return
    for s, e in attributes:
        name = b""
        tensors: list[tuple[int, int]] = []
        for number, fs, fe in safeload._fields(buf, s, e):
            if number == _ATTR_NAME:
                name = bytes(buf[fs:fe])
            elif number == _ATTR_T:
                tensors.append((fs, fe))
        if name == b"value":
            for fs, fe in tensors:
                yield from safeload._tensor_locations(buf, fs, fe)


def _in_memory_reachable(buf: memoryview) -> list[str]:
    """The locations onnxruntime takes from the in-memory table (main graph only)."""
    found: list[str] = []
    for number, s, e in safeload._fields(buf, 0, len(buf)):
        if number != _MODEL_GRAPH:
            continue
        for gn, gs, ge in safeload._fields(buf, s, e):
            if gn == _GRAPH_INIT:
                found.extend(safeload._tensor_locations(buf, gs, ge))
            elif gn == _GRAPH_NODE:
                found.extend(_node_constant_locations(buf, gs, ge))
    return found


def check_model_bytes(files: Mapping[str, memoryview], model_rel: str) -> dict[str, memoryview]:
    """Check an in-memory model and its external data; return ``{location: view}``.

    ``files`` maps payload paths to their bytes; ``model_rel`` is the model's
    payload path. Every location the model names must be plainly relative and
    name a payload file in the model's folder, and sit where onnxruntime takes
    it from memory; the keys of the result are the locations as the model
    writes them (what onnxruntime looks up). Raises :class:`UnsafeModelError`.
    """
    _check_name(model_rel, "the model path")
    model = files.get(model_rel)
    if model is None:
        raise UnsafeModelError(f"the model file {model_rel!r} is not in the revision's payload")
    buf = memoryview(model).cast("B")
    if not len(buf):
        raise UnsafeModelError(f"the model file {model_rel!r} is empty")
    locations = safeload.external_data_locations_in(buf)
    folder = PurePosixPath(model_rel).parent
    found: dict[str, memoryview] = {}
    for location in locations:
        _check_name(location, "external-data location")
        path = str(folder / location)
        view = files.get(path)
        if view is None:
            raise UnsafeModelError(
                f"external-data location {location!r} names no file of the revision's "
                f"payload ({path}); refusing the model"
            )
        found[location] = view
    outside = Counter(locations) - Counter(_in_memory_reachable(buf))
    if outside:
        location = next(iter(outside))
        raise UnsafeModelError(
            f"external data {location!r} is used outside the main graph's initializers "
            "(a subgraph, function, sparse tensor or node attribute): onnxruntime would "
            "read it from a file, not from memory; refusing the model",
            hint=_REPACK,
        )
    return found


def open_session_from_memory(
    files: Mapping[str, memoryview], model_rel: str, providers: list[str] | None = None
) -> Any:
    """Check then load an in-memory model with onnxruntime; no file is read or written.

    The buffers need to live only until this returns: onnxruntime copies what
    it needs while it creates the session, and the session keeps no reference
    to them. The session cannot be re-created (``set_providers`` fails; no
    fallback to another provider at run time): open a new one instead.
    """
    external = check_model_bytes(files, model_rel)
    return _create_session(bytes(files[model_rel]), external, providers)


def _create_session(
    model: bytes, external: Mapping[str, memoryview], providers: list[str] | None
) -> Any:
    """An onnxruntime session of ``model`` with ``external`` as its only external data."""
    import onnxruntime as ort  # heavy: imported only when a model is loaded

    options = ort.SessionOptions()
    options.log_severity_level = 3
    names = list(external)
    buffers: list[Any] = [memoryview(external[n]).cast("B") for n in names]
    if not names:  # the table set anyway: a location the walk missed fails, never opens a file
        names, buffers = [_NO_FILE], [bytearray(1)]
    options.add_external_initializers_from_files_in_memory(
        names, buffers, [len(b) for b in buffers]
    )
    session = ort.InferenceSession(model, options, providers=providers or ["CPUExecutionProvider"])
    # Never re-created: a re-creation (onnxruntime's fallback after a provider error at run
    # time, or set_providers) would read the caller's buffers again, wiped or freed by then.
    # The Python binding also keeps the model's bytes for that re-creation; dropping them
    # frees a plaintext copy of the whole model (all its weights, when they are inside it).
    session.disable_fallback()
    if getattr(session, "_model_bytes", None) is not None:
        session._model_bytes = None
    return session
