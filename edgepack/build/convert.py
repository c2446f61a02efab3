"""Turn a trained model into an fp32 ONNX file in the builder's working directory.

Inputs: ONNX files (external data included, checked to stay in the model's
folder), torch ``nn.Module`` objects and ``.pt2`` ExportedProgram files (both
torch exporters tried, the result checked against torch on the example and on
shapes varied along the declared dynamic axes), scikit-learn estimators
(skl2onnx, no ZipMap) and, only when explicitly allowed, pickle/joblib files.
"""

from __future__ import annotations

import inspect
import os
import pickle
import re
import shutil
import sys
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from onnx import external_data_helper

from edgepack.build._util import sha256_tree, tool_versions
from edgepack.build.samples import Array, Feed
from edgepack.errors import InvalidInputError

TORCH_HINT = "install the torch extra: pip install 'edgepack[torch]'"
PICKLE_RISK = (
    "loading a pickle/joblib file runs whatever code it holds (arbitrary code execution, as in "
    "ShellTorch-class attacks); only load files you built yourself"
)
PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib")
TORCH_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")

Reference = Callable[[Feed], list[Array]]


@dataclass
class Converted:
    """The fp32 ONNX model and what is known about where it came from."""

    path: Path
    converter: str
    source_digest: str
    tools: dict[str, str]
    reference: Reference | None = None
    example: Feed | None = None
    classifier: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TorchOptions:
    """What the torch exporters need: example inputs, names and the declared dynamic axes."""

    example_inputs: tuple[Any, ...] = ()
    input_names: Sequence[str] | None = None
    output_names: Sequence[str] | None = None
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None


def convert(
    model: Any,
    workdir: Path,
    *,
    allow_pickle: bool = False,
    torch_options: TorchOptions | None = None,
    sample: Feed | None = None,
) -> Converted:
    """Convert ``model`` (a path or an in-memory model) to ``workdir/fp32/model.onnx``."""
    options = torch_options or TorchOptions()
    out_dir = workdir / "fp32"
    out_dir.mkdir(parents=True)
    if isinstance(model, (str, Path)):
        return _from_path(Path(model), out_dir, allow_pickle, options, sample)
    if isinstance(model, onnx.ModelProto):
        target = out_dir / "model.onnx"
        onnx.save_model(model, str(target))
        return Converted(target, "onnx", sha256_tree([target], out_dir), tool_versions())
    return _from_object(model, out_dir, options, sample, digest=None)


def _from_path(
    path: Path, out_dir: Path, allow_pickle: bool, options: TorchOptions, sample: Feed | None
) -> Converted:
    if not path.is_file():
        raise InvalidInputError(f"cannot read model file {path}: no such file")
    if not os.access(path, os.R_OK):
        raise InvalidInputError(f"cannot read model file {path}: permission denied")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise InvalidInputError(
                f"{path.name} is a pickle/joblib file and loading it can run arbitrary code",
                hint="pass --allow-pickle if you built this file yourself, or convert it to ONNX",
            )
        digest = sha256_tree([path], path.parent)
        return _from_object(_load_pickle(path), out_dir, options, sample, digest=digest)
    if suffix == ".pt2":
        digest = sha256_tree([path], path.parent)
        program = _load_pt2(path, allow_pickle)
        return _from_object(program, out_dir, options, sample, digest=digest)
    if suffix in TORCH_CHECKPOINT_SUFFIXES:
        _reject_checkpoint(path)
    return _copy_onnx(path, out_dir)


def _load_pickle(path: Path) -> Any:
    if path.suffix.lower() == ".joblib":
        import joblib

        return joblib.load(path)
    with open(path, "rb") as handle:
        return pickle.load(handle)  # noqa: S301 - only reached with --allow-pickle


def _reject_checkpoint(path: Path) -> None:
    """A torch checkpoint holds weights, not a model; say what to give instead."""
    torch = _torch()
    try:
        content = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise InvalidInputError(
            f"{path.name} is not a model edgepack can read: torch.load(weights_only=True) "
            f"refused it ({_first_line(exc)})",
            hint="export the model to ONNX or to a .pt2 file with torch.export.save",
        ) from exc
    raise InvalidInputError(
        f"{path.name} holds {type(content).__name__} weights, not a model",
        hint="export the model with torch.export.save(torch.export.export(model, args), 'model.pt2') "
        "or pass the nn.Module to edgepack.build.build()",
    )


def _load_pt2(path: Path, allow_pickle: bool) -> Any:
    """Load an ExportedProgram with every torch.load forced to ``weights_only=True``.

    ``torch.export.load`` itself falls back to full pickle for some entries and
    unpickles custom/opaque objects; archives holding those need --allow-pickle.
    """
    torch = _torch()
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise InvalidInputError(f"{path.name} is not a .pt2 archive: {exc}") from exc
    risky = [n for n in names if re.search(r"/(custom_obj|opaque_obj)", n)]
    if risky and not allow_pickle:
        raise InvalidInputError(
            f"{path.name} holds pickled objects ({risky[0]}) that load as code",
            hint="pass --allow-pickle if you built this file yourself",
        )
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        return torch.export.load(str(path))
    except Exception as exc:
        raise InvalidInputError(
            f"cannot load {path.name} as a torch ExportedProgram: {_first_line(exc)}",
            hint="save it with torch.export.save from torch " + torch.__version__,
        ) from exc
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def _from_object(
    model: Any, out_dir: Path, options: TorchOptions, sample: Feed | None, digest: str | None
) -> Converted:
    if _is_torch_model(model):
        from edgepack.build import _torch as torch_export

        converted = torch_export.convert(model, out_dir, options, sample)
    elif _looks_like_estimator(model):
        from edgepack.build import _sklearn

        converted = _sklearn.convert(model, out_dir)
    else:
        raise InvalidInputError(
            f"cannot convert a {type(model).__module__}.{type(model).__name__} to ONNX",
            hint="give an ONNX file, a torch nn.Module/ExportedProgram or a scikit-learn estimator",
        )
    if digest is not None:
        converted.source_digest = digest
    return converted


def _is_torch_model(model: Any) -> bool:
    """A torch module or exported program (torch is only looked at when already imported)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    return isinstance(model, (torch.nn.Module, torch.export.ExportedProgram))


def _looks_like_estimator(model: Any) -> bool:
    return hasattr(model, "fit") and hasattr(model, "get_params")


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise InvalidInputError("PyTorch is not installed", hint=TORCH_HINT) from exc
    return torch


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


# --- ONNX files ---------------------------------------------------------------------------


def _copy_onnx(path: Path, out_dir: Path) -> Converted:
    """Check an ONNX file and its external data, then copy both into the working directory."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, OSError) as exc:
        raise InvalidInputError(
            f"{path.name} is not an ONNX model ({_first_line(exc)})",
            hint="give an .onnx file, a .pt2 ExportedProgram, or (with --allow-pickle) a pickle",
        ) from exc
    if model.ir_version <= 0 or not model.graph.node:
        raise InvalidInputError(
            f"{path.name} is not an ONNX model (no graph inside)",
            hint="give an .onnx file, a .pt2 ExportedProgram, or (with --allow-pickle) a pickle",
        )
    folder = path.parent.resolve()
    files = [path]
    target = out_dir / "model.onnx"
    for location in external_locations(model, path.name):
        source = (folder / location).resolve()
        if not source.is_relative_to(folder):
            raise InvalidInputError(
                f"{path.name}: external data {location!r} resolves outside the model's folder",
                hint="keep weight files next to the model, referenced by relative names",
            )
        if not source.is_file():
            raise InvalidInputError(f"{path.name}: external data file {location!r} is missing")
        if (folder / location).lstat().st_nlink > 1:
            # A hard link's other name may be any file on the machine: never copy one in.
            raise InvalidInputError(
                f"{path.name}: external data file {location!r} is a hard link; copy the file instead"
            )
        copy = out_dir / location
        copy.parent.mkdir(parents=True, exist_ok=True)
        if source not in files:
            shutil.copyfile(source, copy)
            files.append(source)
    shutil.copyfile(path, target)
    _check_external_bounds(model, out_dir)
    return Converted(target, "onnx", sha256_tree(files, folder), tool_versions())


def external_locations(model: onnx.ModelProto, name: str) -> list[str]:
    """The external-data file names a model refers to, each checked to be relative and inside."""
    locations: list[str] = []
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        posix, windows = PurePosixPath(location), PureWindowsPath(location)
        if not location or posix.is_absolute() or windows.is_absolute() or windows.drive:
            raise InvalidInputError(
                f"{name}: tensor {tensor.name!r} has external data at {location!r}, an absolute "
                "or empty path",
                hint="keep weight files next to the model, referenced by relative names",
            )
        if ".." in posix.parts or ".." in windows.parts:
            raise InvalidInputError(
                f"{name}: tensor {tensor.name!r} has external data at {location!r}, outside the "
                "model's folder",
                hint="keep weight files next to the model, referenced by relative names",
            )
        if location not in locations:
            locations.append(location)
    return locations


def _check_external_bounds(model: onnx.ModelProto, folder: Path) -> None:
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        size = (folder / info["location"]).stat().st_size
        offset, length = int(info.get("offset", 0)), int(info.get("length", 0))
        if offset < 0 or length < 0 or offset + length > size:
            raise InvalidInputError(
                f"tensor {tensor.name!r}: external data range {offset}+{length} lies beyond the "
                f"end of {info['location']} ({size} bytes)"
            )


# --- shared by the torch and scikit-learn converters ----------------------------------------


def signature_names(function: Callable[..., Any], count: int) -> list[str]:
    """Parameter names of ``forward`` (what torch names the inputs), padded positionally."""
    try:
        params = [
            p.name
            for p in inspect.signature(function).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    return [params[i] if i < len(params) else f"input_{i}" for i in range(count)]


def as_float32(feed: Feed) -> Feed:
    """Cast float64 arrays to float32 (float64 samples would make DOUBLE model inputs)."""
    return {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in feed.items()}
