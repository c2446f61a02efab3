"""Real parts for the agent's tests: tiny ONNX models, real bundles, a real TUF repository
served over loopback HTTP (with Range support and fault injection), enrolled devices."""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from device_agent import enroll as enroll_mod
from device_agent.config import Limits
from edgepack import bundle, keys
from edgepack.signing import ProducerKeySigner
from tests.agent._tufrepo import TufRepo

MODEL = "digits"


def make_model_dir(
    dest: Path, scale: float, *, pad_bytes: int = 0, bad_golden: bool = False
) -> dict[str, Any]:
    """A model directory (model.onnx + health/golden.npz): Y = X * scale + 1.

    ``pad_bytes`` adds an unused initializer of random bytes (incompressible
    size for disk tests); ``bad_golden`` records wrong expected outputs, so
    the health check must fail.
    """
    dest.mkdir(parents=True, exist_ok=True)
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])
    inits = [
        numpy_helper.from_array(np.full((1, 4), scale, np.float32), "W"),
        numpy_helper.from_array(np.ones((1, 4), np.float32), "B"),
    ]
    if pad_bytes:
        rng = np.random.default_rng(int(scale * 1000))
        pad = rng.integers(0, 255, size=pad_bytes, dtype=np.uint8)
        inits.append(numpy_helper.from_array(pad, "PAD"))
    nodes = [helper.make_node("Mul", ["X", "W"], ["T"]), helper.make_node("Add", ["T", "B"], ["Y"])]
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(dest / "model.onnx"))
    sess = ort.InferenceSession(str(dest / "model.onnx"), providers=["CPUExecutionProvider"])
    inp = np.arange(4, dtype=np.float32).reshape(1, 4)
    out = sess.run(None, {"X": inp})[0]
    if bad_golden:
        out = out + 10.0
    (dest / "health").mkdir(exist_ok=True)
    np.savez(dest / "health" / "golden.npz", case0_in0=inp, case0_out0=out)
    return {
        "file": "health/golden.npz",
        "cases": 1,
        "tolerances": {"atol": 1e-4, "rtol": 1e-3, "label_agreement": 1.0},
        "budgets": {"latency_ms": 2000.0, "memory_mb": 2048.0},
    }


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files with ``Range`` support and the server's fault modes."""

    server: FaultServer

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        fault = srv.fault if srv.fault_match in self.path else None
        if fault == "hang":
            time.sleep(srv.hang_s)
            return
        if fault == "drip-headers":  # each byte well within a read timeout, the head never ends
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            deadline = time.monotonic() + srv.hang_s
            while time.monotonic() < deadline:
                try:
                    self.wfile.write(b"X")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.1)
            return
        rel = self.path.split("?", 1)[0].lstrip("/")
        path = srv.root / rel
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        if fault == "garbage":
            data = os.urandom(len(data))
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and srv.ranges:
            start = int(rng[6:].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if fault == "cut":
            self.wfile.write(body[: srv.cut_at])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        if fault == "slow":
            for i in range(0, len(body), 64):
                self.wfile.write(body[i : i + 64])
                self.wfile.flush()
                time.sleep(0.05)
            return
        self.wfile.write(body)


class FaultServer(http.server.ThreadingHTTPServer):
    """A loopback HTTP server over a directory; ``fault`` applies to paths containing ``fault_match``."""

    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.requests: list[tuple[str, str | None]] = []
        self.fault: str | None = None
        self.fault_match = ".epk"
        self.cut_at = 1000
        self.hang_s = 5.0
        self.ranges = True
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def bundle_requests(self) -> list[tuple[str, str | None]]:
        return [r for r in self.requests if r[0].endswith(".epk")]

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


@dataclass
class World:
    """A served repository, a producer key, a fleet recipient key, bundles made on demand."""

    base: Path
    repo: TufRepo
    producer_key: Any
    producer_pub: Path
    fleet_key: Any
    fleet_key_path: Path
    server: FaultServer
    bundles: dict[str, Path] = field(default_factory=dict)
    targets: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls, base: Path) -> World:
        base.mkdir(parents=True, exist_ok=True)
        tuf_repo = TufRepo(base / "public", MODEL)
        producer = keys.generate_signing_key()
        keys.write_keypair(base / "producer", producer)
        fleet = keys.generate_recipient_key()
        keys.write_recipient_keypair(base / "fleet", fleet)
        server = FaultServer(base / "public")
        return cls(
            base, tuf_repo, producer, base / "producer.pub", fleet, base / "fleet.key", server
        )

    @property
    def root_json(self) -> Path:
        return self.base / "public" / "metadata" / "1.root.json"

    def make_bundle(
        self, version: str, scale: float, *, pad_bytes: int = 0, bad_golden: bool = False
    ) -> Path:
        src = self.base / f"src-{version}"
        shutil.rmtree(src, ignore_errors=True)
        hp = make_model_dir(src, scale, pad_bytes=pad_bytes, bad_golden=bad_golden)
        result = bundle.pack(
            src,
            self.base / "bundles",
            name=MODEL,
            version=version,
            recipients=[self.fleet_key.public_key()],
            signer=ProducerKeySigner(self.producer_key),
            health=hp,
        )
        self.bundles[version] = result.path
        return result.path

    def publish(self, version: str, scale: float, *, promote: bool = True, **kw: Any) -> Path:
        """Build, add and (by default) promote a release to the stable channel."""
        path = self.make_bundle(version, scale, **kw)
        self.targets[version] = self.repo.add_bundle(path, version)
        if promote:
            self.repo.promote(version, self.targets[version])
        return path

    def enroll(
        self,
        data_dir: Path,
        limits: Limits | None = None,
        url: str | None = None,
        *,
        at_rest: str | None = None,
        recipient_key: Path | None = None,
        profile: str = "auto",
    ) -> str:
        result = enroll_mod.enroll(
            data_dir,
            repo_url=url or self.server.url,
            root=self.root_json,
            models=[MODEL],
            trust=self.producer_pub,
            recipient_key=recipient_key or self.fleet_key_path,
            limits=limits or fast_limits(),
            at_rest=at_rest,
            profile=profile,
        )
        return result.device_id


def fast_limits(**overrides: Any) -> Limits:
    """Limits suited to tests on loopback: short timeouts, no latency re-runs to speak of."""
    base: dict[str, Any] = {
        "connect_timeout_s": 2.0,
        "read_timeout_s": 2.0,
        "slow_grace_s": 1.0,
        "min_speed_bps": 1024,
        "health_latency_runs": 1,
        "chunk_bytes": 64 * 1024,
        "free_space_margin_bytes": 0,
    }
    base.update(overrides)
    return Limits(**base)


def tree_digest(path: Path) -> str:
    """Digest of a folder's files (names and bytes), to compare revisions."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


REPO_ROOT = Path(__file__).resolve().parents[2]
# What a developer's shell may hold that would change what the agent does in a test.
_AGENT_ENV_UNSET = ("EDGEPACK_", "JOURNAL_", "CREDENTIALS_DIRECTORY")


def run_agent(
    *args: str, data: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The real ``edgepack-agent`` program in a subprocess, without a terminal.

    It runs without the caller's ``EDGEPACK_*``, ``JOURNAL_*`` and
    ``CREDENTIALS_DIRECTORY`` settings, plus ``env``; ``data``, when given, is its
    ``EDGEPACK_DATA_DIR``.
    """
    full = {k: v for k, v in os.environ.items() if not k.startswith(_AGENT_ENV_UNSET)}
    full.update(env or {})
    if data is not None:
        full["EDGEPACK_DATA_DIR"] = str(data)
    return subprocess.run(
        [sys.executable, "-m", "device_agent", *args],
        capture_output=True,
        text=True,
        env=full,
        stdin=subprocess.DEVNULL,
        timeout=120,
        cwd=REPO_ROOT,
        check=False,
    )
