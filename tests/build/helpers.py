"""Checks shared by the builder's tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort


def replay_health(model_dir: Path, health: dict[str, Any]) -> None:
    """Replay the golden health set the way docs/architecture.md says the agent does."""
    session = ort.InferenceSession(
        str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    names = [i.name for i in session.get_inputs()]
    tol = health["tolerances"]
    with np.load(model_dir / health["file"], allow_pickle=False) as golden:
        for case in range(health["cases"]):
            feed = {name: golden[f"case{case}_in{j}"] for j, name in enumerate(names)}
            for k, actual in enumerate(session.run(None, feed)):
                expected = golden[f"case{case}_out{k}"]
                if expected.dtype.kind == "f":
                    assert np.allclose(actual, expected, atol=tol["atol"], rtol=tol["rtol"])
                else:
                    assert np.mean(actual == expected) >= tol["label_agreement"]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    result: np.ndarray = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return result


def outdir_files(path: Path) -> list[str]:
    """Everything in OUTDIR (hidden files included), or [] when it does not exist."""
    return sorted(p.name for p in path.rglob("*")) if path.exists() else []
