"""Shared fixtures for bundle tests: real keys, a real ONNX model, a packed bundle."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from onnx import TensorProto, helper, numpy_helper

from edgepack.bundle import PackResult, pack
from edgepack.keys import generate_recipient_key, generate_signing_key
from edgepack.signing import ProducerKeySigner, TrustPolicy


@dataclass
class Keys:
    """A producer and two recipients, one of them a stranger to the bundle."""

    producer: ec.EllipticCurvePrivateKey
    recipient: x25519.X25519PrivateKey
    other_recipient: x25519.X25519PrivateKey
    stranger: x25519.X25519PrivateKey

    @property
    def policy(self) -> TrustPolicy:
        return TrustPolicy.from_keys([self.producer.public_key()])


@pytest.fixture(scope="session")
def keys() -> Keys:
    return Keys(
        generate_signing_key(),
        generate_recipient_key(),
        generate_recipient_key(),
        generate_recipient_key(),
    )


def write_linear_model(model_dir: Path, seed: int = 0, size: int = 64) -> None:
    """A small real ONNX model (MatMul + Add) with its weights in an external-data file."""
    model_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.standard_normal((size, size)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal((size,)).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", size])],
        [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(
        model,
        str(model_dir / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
    )


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "model"
    write_linear_model(directory)
    return directory


def pack_model(model_dir: Path, out: Path, keys: Keys, **kwargs: object) -> PackResult:
    """Pack with small segments so the payload spans several of them."""
    options: dict[str, object] = {
        "name": "linear",
        "version": "1.0.0",
        "recipients": [keys.recipient.public_key(), keys.other_recipient.public_key()],
        "signer": ProducerKeySigner(keys.producer),
        "segment_size": 4096,
    }
    options.update(kwargs)
    return pack(model_dir, out, **options)  # type: ignore[arg-type]


@pytest.fixture
def bundle(model_dir: Path, tmp_path: Path, keys: Keys) -> PackResult:
    return pack_model(model_dir, tmp_path / "out", keys)
