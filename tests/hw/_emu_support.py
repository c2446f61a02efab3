"""Host-side parts of the end-to-end test of the agent on emulated aarch64.

The host plays the model team and the fleet operator with the real ``edgepack``
commands (subprocesses of this checkout's Python), and serves the repository with
the product's development server (:func:`edgepack.repo.make_server`, what
``edgepack repo serve`` runs) on 127.0.0.1, recording each request so a test can
tell what the device downloaded. The guest side is ``run_in_guest`` of
``tests/hw/test_emulation.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgepack.repo import _serve, make_server

PASSPHRASE = "emulation-test-passphrase"

Array = npt.NDArray[np.float32]


# ---------------------------------------------------------------------- the model
@dataclass(frozen=True)
class TinyMlp:
    """Weights of a two-layer MLP: ``y = relu(x @ w1 + b1) @ w2``."""

    w1: Array
    b1: Array
    w2: Array

    @classmethod
    def random(cls, seed: int, inputs: int = 16, hidden: int = 32, outputs: int = 4) -> TinyMlp:
        rng = np.random.default_rng(seed)
        return cls(
            rng.standard_normal((inputs, hidden)).astype(np.float32),
            rng.standard_normal(hidden).astype(np.float32),
            rng.standard_normal((hidden, outputs)).astype(np.float32),
        )

    def __call__(self, x: Array) -> Array:
        """The fp32 reference output, in numpy."""
        out: Array = np.maximum(x @ self.w1 + self.b1, 0.0) @ self.w2
        return out

    def save_onnx(self, path: Path) -> Path:
        """Write the MLP as ONNX (MatMul, Add, Relu, MatMul; dynamic batch)."""
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        nodes = [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Add", ["h", "b1"], ["a"]),
            helper.make_node("Relu", ["a"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ]
        graph = helper.make_graph(
            nodes,
            "tiny-mlp",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", self.w1.shape[0]])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", self.w2.shape[1]])],
            [
                numpy_helper.from_array(self.w1, "w1"),
                numpy_helper.from_array(self.b1, "b1"),
                numpy_helper.from_array(self.w2, "w2"),
            ],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
        return path


def row_cosines(a: Array, b: Array) -> npt.NDArray[np.float64]:
    """Cosine similarity of each row of ``a`` with the same row of ``b``."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    out: npt.NDArray[np.float64] = np.sum(a64 * b64, axis=1) / norms
    return out


def relative_error(actual: Array, expected: Array) -> float:
    """``|actual - expected| / |expected|`` (Frobenius norms)."""
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


# ---------------------------------------------------------------------- the operator
class CommandError(AssertionError):
    """An ``edgepack`` command failed; the message holds its stderr."""


@dataclass
class Operator:
    """Runs the real ``edgepack`` commands on the host, keys passphrase-protected."""

    workdir: Path
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.env = {**os.environ, "EDGEPACK_PASSPHRASE": PASSPHRASE, **self.env}

    def __call__(self, *args: str) -> Any:
        """``edgepack ARGS --json``; the parsed JSON it prints."""
        argv = [sys.executable, "-m", "edgepack.cli", *args, "--json"]
        proc = subprocess.run(
            argv,
            env=self.env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if proc.returncode != 0:
            raise CommandError(
                f"edgepack {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
            )
        return json.loads(proc.stdout) if proc.stdout.strip() else None


# ---------------------------------------------------------------------- the server
class _RecordingHandler(_serve._QuietHandler):
    """The development server's handler, also noting each request's path and status."""

    log: list[tuple[str, int]]

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        self.log.append((self.path, int(code)))


@dataclass
class RepoServer:
    """A repository served on loopback; ``requests`` lists (path, status) in order."""

    url: str
    requests: list[tuple[str, int]]

    def bundle_requests(self) -> list[str]:
        """Paths of the bundle files (``.epk``) requested so far."""
        return [path for path, _ in self.requests if path.endswith(".epk")]


@contextmanager
def serve_repository(workdir: Path) -> Iterator[RepoServer]:
    """Serve ``WORKDIR/public`` with :func:`edgepack.repo.make_server` on 127.0.0.1."""
    httpd = make_server(workdir, "127.0.0.1", 0)
    log: list[tuple[str, int]] = []
    handler = type("Handler", (_RecordingHandler,), {"log": log})
    httpd.RequestHandlerClass = partial(handler, directory=str(workdir / "public"))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield RepoServer(f"http://127.0.0.1:{httpd.server_address[1]}", log)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


# ---------------------------------------------------------------------- shared files
@contextmanager
def guest_visible_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory the guest sees at the same path: ``tmp_path`` when it lies under
    /tmp (run-aarch64.sh binds /tmp into the guest), else a fresh one in /tmp."""
    if tmp_path.resolve().is_relative_to("/tmp"):
        yield tmp_path.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="edgepack-emu-", dir="/tmp") as path:
        yield Path(path)
