"""Validly signed models that are hostile to the process running them.

Each is packed and signed by the producer and published like any release: a
custom op onnxruntime does not have, a runtime error, a tensor of 4 TiB and a
loop that never ends. Each must become that release's health-check failure,
with its cause, while the device keeps its working model and the agent keeps
running (the check runs in a child process with memory and time limits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from device_agent import config, loop
from device_agent.agent import Agent
from device_agent.slots import Slots
from device_agent.state import Journal
from edgepack import bundle
from edgepack.signing import ProducerKeySigner
from tests.agent._support import MODEL, World, fast_limits


def _graph(kind: str) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    opsets = [helper.make_opsetid("", 17)]
    inits: list[onnx.TensorProto] = []
    if kind == "custom-op":
        nodes = [helper.make_node("Explode", ["X"], ["Y"], domain="com.example.evil")]
        opsets.append(helper.make_opsetid("com.example.evil", 1))
    elif kind == "runtime-error":
        # The shape comes in at run time (no constant folding can catch it at load).
        nodes = [
            helper.make_node("Shape", ["X"], ["S0"]),
            helper.make_node("ReduceProd", ["S0"], ["N"], keepdims=1),
            helper.make_node("Add", ["N", "one"], ["S"]),
            helper.make_node("Reshape", ["X", "S"], ["Y"]),
        ]
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "one"))
    elif kind == "memory-bomb":
        inits.append(numpy_helper.from_array(np.array([2**40], np.int64), "huge"))
        nodes = [
            helper.make_node("ConstantOfShape", ["huge"], ["Z"]),
            helper.make_node("ReduceSum", ["Z"], ["R"], keepdims=1),
            helper.make_node("Add", ["X", "R"], ["Y"]),
        ]
    elif kind == "endless":
        trip = helper.make_tensor_value_info("i", TensorProto.INT64, [])
        cond_in = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
        cond_out = helper.make_tensor_value_info("c_out", TensorProto.BOOL, [])
        carried_in = helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 4])
        carried_out = helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, 4])
        body = helper.make_graph(
            [
                helper.make_node("Identity", ["c"], ["c_out"]),
                helper.make_node("Sin", ["v"], ["v_out"]),
            ],
            "body",
            [trip, cond_in, carried_in],
            [cond_out, carried_out],
        )
        inits += [
            numpy_helper.from_array(np.array(2**62, np.int64), "max"),
            numpy_helper.from_array(np.array(True), "go"),
        ]
        nodes = [helper.make_node("Loop", ["max", "go", "X"], ["Y"], body=body)]
    else:
        raise AssertionError(kind)
    graph = helper.make_graph(nodes, kind, [x], [y], inits)
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def _publish_hostile(world: World, version: str, kind: str) -> None:
    src = world.base / f"hostile-{kind}"
    (src / "health").mkdir(parents=True)
    onnx.save(_graph(kind), str(src / "model.onnx"))
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    np.savez(src / "health" / "golden.npz", case0_in0=x, case0_out0=x)
    health: dict[str, Any] = {
        "file": "health/golden.npz",
        "cases": 1,
        "tolerances": {"atol": 1e-4, "rtol": 1e-3, "label_agreement": 1.0},
        "budgets": {"latency_ms": 60000.0, "memory_mb": 8192.0},
    }
    result = bundle.pack(
        src,
        world.base / "bundles",
        name=MODEL,
        version=version,
        recipients=[world.fleet_key.public_key()],
        signer=ProducerKeySigner(world.producer_key),
        health=health,
    )
    world.targets[version] = world.repo.add_bundle(result.path, version)
    world.repo.promote(version, world.targets[version])


@pytest.mark.parametrize(
    ("kind", "cause"),
    [
        ("custom-op", "cannot be loaded or run"),
        ("runtime-error", "cannot be loaded or run"),
        ("memory-bomb", "health check failed"),
        ("endless", "did not finish its health check in 5 s"),
    ],
)
def test_a_hostile_model_is_its_release_s_failure_and_the_agent_keeps_running(
    world: World, tmp_path: Path, kind: str, cause: str
) -> None:
    data = tmp_path / "dev"
    world.enroll(data, fast_limits(health_timeout_s=5.0, health_memory_mb=2048))
    world.publish("1.0.0", 2.0)
    assert loop.poll_once(Agent(config.load(data)))[0].action == "installed"
    good = Slots(data, MODEL).current()
    _publish_hostile(world, "2.0.0", kind)
    out = loop.poll_once(Agent(config.load(data)))[0]
    assert out.action == "failed", out
    assert cause in str(out.error), out.error
    assert Slots(data, MODEL).current() == good
    # Recorded against the release, with its cause, and not retried.
    assert cause in Journal.load(data).model(MODEL).failed["2.0.0"]
    assert loop.poll_once(Agent(config.load(data)))[0].action == "kept"
