"""The agent's code on aarch64 under qemu user-mode emulation (hw/emulation/).

The session fixture prepares the emulated Debian arm64 root once (idempotent and
cached under hw/emulation/cache/: minutes cold, about a second warm). The tests skip,
with the reason, only when this machine cannot run the emulation at all (not root,
no binfmt_misc, no apt); a setup that starts and then fails is a test failure.

:func:`run_in_guest` runs any command in the guest, with the checkout and /tmp at
the same paths as on the host and the host's loopback network: the end-to-end agent
test reuses it. Timings under emulation are roughly 10x slower than native x86 and
say nothing about ARM hardware; never report them as ARM performance figures.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import platform
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.emulation, pytest.mark.timeout(1800)]

CHECKOUT = Path(__file__).resolve().parents[2]
EMULATION = CHECKOUT / "hw" / "emulation"
CANNOT_RUN = 3  # exit status of aarch64.sh / run-aarch64.sh: this machine cannot emulate


def run_in_guest(
    *command: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 600,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` inside the aarch64 guest and return its result (text output).

    ``env`` adds variables for the guest (and ``EDGEPACK_EMU_BOARD`` selects an
    emulated board model); ``cwd`` must lie in the checkout or under /tmp to be kept.
    With ``check``, a non-zero exit raises with the guest's stderr.
    """
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
        full_env["EDGEPACK_EMU_ENV"] = " ".join(k for k in env if not k.startswith("EDGEPACK_"))
    result = subprocess.run(
        [str(EMULATION / "run-aarch64.sh"), *command],
        cwd=cwd or CHECKOUT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"guest command {list(command)} exited {result.returncode}:\n{result.stderr[-4000:]}"
        )
    return result


def guest_python(code: str, *args: str, env: Mapping[str, str] | None = None) -> str:
    """Run Python source in the guest's aarch64 python3; return its stdout."""
    return run_in_guest("python3", "-c", code, *args, env=env).stdout


@pytest.fixture(scope="session")
def aarch64_guest() -> None:
    """Prepare the emulation (cached); skip with the reason when this machine cannot run it."""
    if sys.platform != "linux":
        pytest.skip(
            f"aarch64 emulation needs Linux (qemu user-mode, binfmt_misc), not {sys.platform}"
        )
    if platform.machine() != "x86_64":
        pytest.skip(f"host is {platform.machine()}, not x86_64: the agent runs natively there")
    if os.geteuid() != 0:
        pytest.skip("aarch64 emulation needs root (apt-get, binfmt_misc, mount namespaces)")
    result = subprocess.run(
        [str(EMULATION / "aarch64.sh")],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if result.returncode == CANNOT_RUN:
        reason = result.stderr.strip().splitlines()[-1:] or ["(no reason printed)"]
        pytest.skip(f"aarch64 emulation cannot be set up on this machine: {reason[0]}")
    assert result.returncode == 0, f"hw/emulation/aarch64.sh failed:\n{result.stderr[-4000:]}"


def _tiny_model(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Write a two-layer MLP (MatMul, Add, Relu, MatMul) and return its weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    w1 = rng.standard_normal((8, 16)).astype(np.float32)
    w2 = rng.standard_normal((16, 3)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, path)
    return w1, w2


INFER = """
import platform, sys
import numpy as np
import onnxruntime as ort
model, x_path, y_path = sys.argv[1:]
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
np.save(y_path, session.run(None, {"x": np.load(x_path)})[0])
print(platform.machine(), ort.__version__, ",".join(session.get_providers()))
"""


def test_guest_python_is_aarch64_and_onnxruntime_infers(
    aarch64_guest: None, tmp_path: Path
) -> None:
    w1, w2 = _tiny_model(tmp_path / "tiny.onnx")
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = guest_python(
        INFER, str(tmp_path / "tiny.onnx"), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")
    )
    machine, _version, providers = out.split()
    assert machine == "aarch64"
    assert providers.split(",")[0] == "CPUExecutionProvider"
    expected = np.maximum(x @ w1, 0) @ w2
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-5, atol=1e-5)


def test_guest_sees_a_cortex_a72(aarch64_guest: None) -> None:
    out = guest_python(
        "import json; from device_agent.hwdetect import read_machine_facts as r;"
        "f = r(); print(json.dumps([f.machine, list(f.cpu.cores), sorted(f.cpu.features)]))"
    )
    machine, cores, features = json.loads(out)
    assert machine == "aarch64"
    assert cores == ["Cortex-A72"]
    assert "asimd" in features and "asimddp" not in features


def test_agent_detect_in_guest_picks_generic_aarch64(aarch64_guest: None) -> None:
    # No board identity under emulation (no device tree, host DMI hidden): the fallback.
    data = json.loads(run_in_guest("edgepack-agent", "detect", "--json").stdout)
    assert data["architecture"] == "aarch64"
    assert data["profile"] == "generic-aarch64"
    assert data["matched_by"] == "fallback"
    assert data["dmi_product_name"] is None and data["device_tree_model"] is None


def test_agent_detect_in_guest_with_an_emulated_pi_4_board(aarch64_guest: None) -> None:
    board = {"EDGEPACK_EMU_BOARD": "Raspberry Pi 4 Model B Rev 1.4"}
    data = json.loads(run_in_guest("edgepack-agent", "detect", "--json", env=board).stdout)
    assert data["profile"] == "raspberry-pi-4"
    assert data["device_tree_model"] == "Raspberry Pi 4 Model B Rev 1.4"


@pytest.fixture
def loopback_server(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "hello.txt").write_text("served by the host\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hello.txt"
    finally:
        server.shutdown()
        server.server_close()


def test_guest_reaches_a_server_on_host_loopback(aarch64_guest: None, loopback_server: str) -> None:
    out = guest_python(
        "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=30).read().decode())",
        loopback_server,
    )
    assert out.strip() == "served by the host"


def test_guest_passes_only_the_environment_it_is_given(aarch64_guest: None) -> None:
    env: dict[str, str] = {"EDGEPACK_DATA_DIR": "/tmp/edgepack-guest", "MY_SETTING": "1"}
    code = "import os, json; print(json.dumps({k: os.environ.get(k) for k in ('EDGEPACK_DATA_DIR', 'MY_SETTING', 'EDGEPACK_EMU_BOARD')}))"
    seen = json.loads(guest_python(code, env=env))
    assert seen == {
        "EDGEPACK_DATA_DIR": "/tmp/edgepack-guest",
        "MY_SETTING": "1",
        "EDGEPACK_EMU_BOARD": None,
    }
