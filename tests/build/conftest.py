"""Shared fixtures for the builder's tests: real data, real keys, tiny real models."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_digits

from edgepack.cli import main
from edgepack.keys import generate_recipient_key, generate_signing_key, write_keypair

HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(
    not HAS_TORCH, reason="PyTorch is not installed (pip install 'edgepack[torch]')"
)


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits, scaled to [0, 1], split 1200 train / 597 held out."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    return x[:1200], y[:1200], x[1200:], y[1200:]


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An unencrypted producer signing key and a recipient key pair."""
    folder = tmp_path_factory.mktemp("keys")
    signing = write_keypair(folder / "producer", generate_signing_key())
    recipient = write_keypair(folder / "fleet", generate_recipient_key())
    return {
        "sign": signing.private,
        "sign_pub": signing.public,
        "recipient": recipient.public,
        "recipient_key": recipient.private,
    }


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run ``edgepack`` in-process; return (exit code, stdout, stderr)."""

    def run(*args: Any) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def build_args(model: Path, keys: dict[str, Path], out: Path, *extra: Any) -> list[Any]:
    """The usual ``edgepack build`` arguments around a model."""
    return [
        "build",
        model,
        "--name",
        "demo",
        "--version",
        "1.0.0",
        "--recipient",
        keys["recipient"],
        "--sign-key",
        keys["sign"],
        "-o",
        out,
        *extra,
    ]
