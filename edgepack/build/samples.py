"""Sample data for validation and calibration: ``.npy``/``.npz`` files or a directory of them.

Files are read with ``allow_pickle=False``: a sample file is data, never code.
A ``.npy`` file holds one input (first axis = samples); a ``.npz`` holds one
array per input, named after the model's inputs or positional (``arr_0``, …),
plus an optional ``labels`` array for accuracy. In a directory each file is one
batch, which keeps variable-length batches (sequences) apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgepack.errors import InvalidInputError

Array = npt.NDArray[Any]
Feed = dict[str, Array]
Dim = int | str | None

LABELS_KEY = "labels"
DEFAULT_BATCH = 16
MAX_FILES = 10_000

_ONNX_TO_NUMPY = {
    1: "float32",
    2: "uint8",
    3: "int8",
    4: "uint16",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
    12: "uint32",
    13: "uint64",
}


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, numpy dtype name and shape (symbolic dims as str/None)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def as_dict(self) -> dict[str, Any]:
        """Plain form used in the bundle's ``model`` metadata."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def numpy_dtype(onnx_elem_type: int) -> str:
    """Numpy dtype name of an ONNX tensor element type (``other`` when unusual)."""
    return _ONNX_TO_NUMPY.get(onnx_elem_type, "other")


@dataclass(frozen=True)
class SampleSet:
    """Sample batches bound to a model's inputs, with optional labels (one per sample)."""

    batches: tuple[Feed, ...]
    labels: Array | None
    origin: str

    @property
    def count(self) -> int:
        """Number of samples over all batches."""
        return sum(len(next(iter(b.values()))) for b in self.batches) if self.batches else 0


RawSamples = str | Path | Array | Mapping[str, Array] | Sequence[Mapping[str, Array]]


def read_raw(source: RawSamples, what: str) -> tuple[list[dict[str, Array]], Array | None, str]:
    """Read sample batches as named arrays, not yet bound to a model.

    Accepts a path (``.npy``, ``.npz``, directory), an array, a mapping of
    arrays, or a list of mappings (one per batch).
    """
    if isinstance(source, (str, Path)):
        return _read_path(Path(source), what)
    if isinstance(source, np.ndarray):
        return [{"arr_0": source}], None, "array"
    if isinstance(source, Mapping):
        batch = {str(k): np.asarray(v) for k, v in source.items()}
        labels = batch.pop(LABELS_KEY, None)
        return [batch], labels, "arrays"
    batches: list[dict[str, Array]] = []
    for item in source:
        if isinstance(item, np.ndarray):
            batches.append({"arr_0": item})
        else:
            batches.append({str(k): np.asarray(v) for k, v in item.items()})
    return batches, None, "batches"


def _read_path(path: Path, what: str) -> tuple[list[dict[str, Array]], Array | None, str]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".npz") and p.is_file())
        if not files:
            raise InvalidInputError(
                f"{what} directory {path} holds no .npy or .npz files",
                hint="put one batch per .npy/.npz file in it",
            )
        if len(files) > MAX_FILES:
            raise InvalidInputError(f"{what} directory {path} holds more than {MAX_FILES} files")
        batches: list[dict[str, Array]] = []
        label_parts: list[Array] = []
        for file in files:
            one, labels, _ = _read_path(file, what)
            batches.extend(one)
            if labels is not None:
                label_parts.append(labels)
        if label_parts and len(label_parts) != len(files):
            raise InvalidInputError(f"{what}: some files in {path} have labels and some do not")
        return batches, (np.concatenate(label_parts) if label_parts else None), str(path)
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InvalidInputError(
            f"cannot read {what} file {path}: {exc}",
            hint="give .npy/.npz files written by numpy.save/numpy.savez (no pickled objects)",
        ) from exc
    if isinstance(loaded, np.ndarray):
        return [{"arr_0": loaded}], None, str(path)
    with loaded:
        batch = {name: loaded[name] for name in loaded.files}
    labels = batch.pop(LABELS_KEY, None)
    return [batch], labels, str(path)


def bind(
    raw: list[dict[str, Array]],
    labels: Array | None,
    origin: str,
    inputs: Sequence[TensorSpec],
    what: str,
    batch_size: int = DEFAULT_BATCH,
) -> SampleSet:
    """Match raw arrays to the model's inputs, check dtypes and shapes, split into batches.

    Names are matched first; otherwise arrays are taken in order. A float64
    array for a float32 input is cast (numpy's default float), every other
    dtype mismatch and every wrong rank or fixed dimension is an error.
    """
    feeds: list[Feed] = []
    for index, batch in enumerate(raw):
        feed = _match_names(batch, inputs, what, origin)
        for spec in inputs:
            feed[spec.name] = _check_array(feed[spec.name], spec, what, origin, index)
        sizes = {len(a) if a.ndim else 1 for a in feed.values()}
        if len(sizes) != 1:
            raise InvalidInputError(
                f"{what} data {origin}: batch {index} has inputs with different numbers of samples"
            )
        feeds.extend(_split(feed, batch_size if len(raw) == 1 else 0))
    if not feeds:
        raise InvalidInputError(f"{what} data {origin} holds no samples")
    result = SampleSet(tuple(feeds), labels, origin)
    if labels is not None and len(labels) != result.count:
        raise InvalidInputError(
            f"{what} data {origin}: {len(labels)} labels for {result.count} samples"
        )
    return result


def _match_names(
    batch: dict[str, Array], inputs: Sequence[TensorSpec], what: str, origin: str
) -> Feed:
    names = [spec.name for spec in inputs]
    if all(name in batch for name in names):
        return {name: batch[name] for name in names}
    if len(batch) == len(names):
        return dict(zip(names, batch.values(), strict=False))
    raise InvalidInputError(
        f"{what} data {origin} has arrays {sorted(batch)} but the model takes inputs {names}",
        hint="name the arrays after the model's inputs (numpy.savez(path, NAME=array, ...))",
    )


def _check_array(array: Array, spec: TensorSpec, what: str, origin: str, index: int) -> Array:
    where = f"{what} data {origin} (batch {index}, input {spec.name!r})"
    if spec.dtype == "float32" and array.dtype == np.float64:
        array = array.astype(np.float32)
    if array.dtype.name != spec.dtype:
        raise InvalidInputError(
            f"{where} has dtype {array.dtype.name} but the model expects {spec.dtype}",
            hint=f"convert it with array.astype('{spec.dtype}')",
        )
    if array.ndim != len(spec.shape):
        raise InvalidInputError(
            f"{where} has shape {list(array.shape)} but the model expects rank {len(spec.shape)} "
            f"({_shape_text(spec.shape)})"
        )
    for axis, (got, want) in enumerate(zip(array.shape, spec.shape, strict=False)):
        if isinstance(want, int) and want > 0 and got != want:
            raise InvalidInputError(
                f"{where} has size {got} on axis {axis} but the model expects "
                f"{_shape_text(spec.shape)}"
            )
    return np.ascontiguousarray(array)


def _shape_text(shape: tuple[Dim, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _split(feed: Feed, batch_size: int) -> list[Feed]:
    count = len(next(iter(feed.values())))
    if batch_size <= 0 or count <= batch_size:
        return [feed]
    return [
        {name: array[start : start + batch_size] for name, array in feed.items()}
        for start in range(0, count, batch_size)
    ]


def synthetic(inputs: Sequence[TensorSpec], batches: int = 4, rows: int = 4) -> SampleSet:
    """Gaussian float inputs for a model given without sample data (symbolic dims become 1).

    Only float inputs can be invented meaningfully; integer inputs (token ids,
    indices) need real samples.
    """
    rng = np.random.default_rng(0)
    feeds: list[Feed] = []
    for _ in range(batches):
        feed: Feed = {}
        for spec in inputs:
            if not spec.dtype.startswith("float"):
                raise InvalidInputError(
                    f"the model's input {spec.name!r} is {spec.dtype}; sample data cannot be invented",
                    hint="pass --validation DATA (.npy/.npz) with real inputs",
                )
            shape = [
                rows
                if axis == 0 and not isinstance(d, int)
                else (d if isinstance(d, int) and d > 0 else 1)
                for axis, d in enumerate(spec.shape)
            ]
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        feeds.append(feed)
    return SampleSet(tuple(feeds), None, "synthetic (no sample data given)")


def head(samples: SampleSet, rows: int, cases: int) -> list[Feed]:
    """Up to ``cases`` small exact batches of at most ``rows`` samples each (for the health set)."""
    result: list[Feed] = []
    for feed in samples.batches:
        count = len(next(iter(feed.values())))
        for start in range(0, count, rows):
            result.append(
                {k: np.ascontiguousarray(v[start : start + rows]) for k, v in feed.items()}
            )
            if len(result) == cases:
                return result
    return result
