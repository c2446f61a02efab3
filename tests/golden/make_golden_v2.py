"""Write the format-v2 golden bundle (with a monitoring reference) (run once; its output is committed and must stay readable forever).

.venv/bin/python tests/golden/make_golden_v1.py tests/golden/v2
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from cryptography.hazmat.primitives import serialization

from edgepack.bundle import pack
from edgepack.keys import generate_recipient_key, generate_signing_key, public_pem
from edgepack.monitoring import build_reference
from edgepack.signing import ProducerKeySigner
from tests.bundle.conftest import write_linear_model


def main(out: Path) -> None:
    """Make keys, a model with a health set, and the bundle with a monitoring reference
    (of random rows through the model: the golden file tests the format, not the statistics), under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    producer, recipient = generate_signing_key(), generate_recipient_key()
    (out / "producer.pub").write_bytes(public_pem(producer.public_key()))
    (out / "recipient.key.pem").write_bytes(
        recipient.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    model = out / "source"
    write_linear_model(model, seed=7, size=16)
    x = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
    (model / "health").mkdir(exist_ok=True)
    np.savez(model / "health" / "golden.npz", case0_in0=x)
    rows = np.random.default_rng(5).standard_normal((64, 16)).astype(np.float32)
    session = ort.InferenceSession(str(model / "model.onnx"), providers=["CPUExecutionProvider"])
    reference = build_reference(
        {"x": rows}, {"y": session.run(None, {"x": rows})[0]}, {"drift_psi": 0.3}
    )
    pack(
        model,
        out,
        name="golden",
        version="1.0.0",
        recipients=[recipient.public_key()],
        signer=ProducerKeySigner(producer),
        profile="generic-x86_64",
        architectures=["x86_64"],
        model_info={
            "path": "model.onnx",
            "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 16]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": ["N", 16]}],
        },
        quantization={"recipe": "none"},
        provenance={"source_digest": "sha256:" + "0" * 64, "tools": {"edgepack": "0.1.0"}},
        health={
            "file": "health/golden.npz",
            "cases": 1,
            "tolerances": {"atol": 1e-4, "rtol": 1e-3},
            "budgets": {"latency_ms": 1000.0, "memory_mb": 512.0},
        },
        monitoring=reference,
        segment_size=4096,
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
