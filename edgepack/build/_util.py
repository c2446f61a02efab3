"""Small helpers shared by the builder: private working directories, digests, tool versions."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

from edgepack._version import __version__

_CHUNK = 1 << 20


@contextlib.contextmanager
def private_cwd(parent: Path) -> Iterator[Path]:
    """Run a tool inside a fresh private directory, then return to where we were.

    ``quant_pre_process`` and the calibrators leave temporary files (a 90 MB
    ``.data`` on a small transformer) in the working directory; running them
    here keeps the user's directory clean and the files inside our staging area.
    """
    here = Path.cwd()
    scratch = Path(tempfile.mkdtemp(prefix="tool-", dir=parent))
    os.chdir(scratch)
    try:
        yield scratch
    finally:
        os.chdir(here)


def sha256_file(path: Path) -> str:
    """Digest of one file as ``sha256:<hex>``, read in bounded chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def sha256_tree(paths: list[Path], root: Path) -> str:
    """Digest of several files (a model and its external data), names included."""
    if len(paths) == 1:
        return sha256_file(paths[0])
    digest = hashlib.sha256()
    for path in sorted(paths):
        name = path.relative_to(root).as_posix()
        digest.update(f"{name}\0{sha256_file(path)}\n".encode())
    return f"sha256:{digest.hexdigest()}"


def tool_versions(*extra: str) -> dict[str, str]:
    """Versions of the tools that shaped a model, for the bundle's provenance."""
    names = ["onnx", "onnxruntime", *extra]
    versions = {"edgepack": __version__}
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def tree_size(directory: Path) -> int:
    """Total size in bytes of the regular files under a directory."""
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def quiet() -> contextlib.ExitStack:
    """Silence converters' progress prints, log lines and warnings (they would break the CLI's output)."""
    stack = contextlib.ExitStack()
    for name in ("torch.onnx", "torch.export", "onnxscript", "skl2onnx", ""):
        logger = logging.getLogger(name)
        stack.callback(logger.setLevel, logger.level)
        logger.setLevel(logging.ERROR)
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack
