"""The real device agent on emulated aarch64, against a repository the host serves.

The host (x86-64) is the model team and the operator: it makes keys, builds a tiny
ONNX MLP for ``generic-aarch64`` and ``generic-x86_64`` with ``edgepack build``,
publishes and promotes it in a TUF repository made with ``edgepack repo init``, and
serves that repository with the product's development server on 127.0.0.1. The
guest (Debian arm64 under qemu user-mode, ``hw/emulation/``) is the device: its
aarch64 Python runs ``edgepack-agent`` from this checkout with aarch64 wheels of
onnxruntime, cryptography and tuf. Nothing is mocked: real keys, real signatures,
real encryption, real HTTP, real onnxruntime health checks on aarch64.

Emulated timings are roughly 10x slower than native x86-64 and say nothing about
ARM hardware: this test proves behaviour, never performance.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.hw import test_emulation as emulation
from tests.hw._emu_support import (
    Operator,
    RepoServer,
    TinyMlp,
    guest_visible_dir,
    relative_error,
    row_cosines,
    serve_repository,
)
from tests.hw.test_emulation import run_in_guest

pytestmark = [pytest.mark.emulation, pytest.mark.slow, pytest.mark.timeout(1800)]

aarch64_guest = emulation.aarch64_guest  # prepares the emulation (cached), or skips saying why

MODEL = "tiny-mlp"
GUEST_PROFILE = "generic-aarch64"  # what detection must choose for the emulated machine
OTHER_PROFILE = "generic-x86_64"  # a variant in the same release the guest must not take


def agent(*args: str) -> Any:
    """``edgepack-agent ARGS --json`` in the aarch64 guest; the JSON it prints."""
    return json.loads(run_in_guest("edgepack-agent", *args, "--json").stdout)


INFER = """
import platform, sys
from pathlib import Path
import numpy as np
from device_agent import open_session
name, data, x_path, y_path = sys.argv[1:]
session = open_session(name, Path(data))
np.save(y_path, session.run(None, {"x": np.load(x_path)})[0])
print(platform.machine())
"""


@dataclass(frozen=True)
class Release:
    """One version built for both profiles, its bundles by profile."""

    version: str
    weights: TinyMlp
    bundles: dict[str, Path]

    def revision(self, profile: str) -> str:
        """The revision name the agent gives this release's ``profile`` bundle."""
        digest = hashlib.sha256(self.bundles[profile].read_bytes()).hexdigest()
        return f"{self.version}-{digest[:12]}"


def build_and_publish(
    op: Operator, base: Path, version: str, seed: int, recipient: Path, validation: Path
) -> Release:
    """``edgepack build`` for both profiles, ``edgepack publish``, ``edgepack promote``."""
    weights = TinyMlp.random(seed)
    source = weights.save_onnx(base / f"mlp-{version}.onnx")
    report = op(
        "build",
        str(source),
        "--name",
        MODEL,
        "--version",
        version,
        "--hw",
        GUEST_PROFILE,
        "--hw",
        OTHER_PROFILE,
        "--validation",
        str(validation),
        "--recipient",
        str(recipient),
        "--sign-key",
        str(base / "producer.key"),
        "-o",
        str(base / "bundles" / version),
    )
    variants = {v["profile"]: v for v in report["variants"]}
    assert variants[GUEST_PROFILE]["architecture"] == "aarch64"
    assert variants[OTHER_PROFILE]["architecture"] == "x86_64"
    bundles = {p: base / "bundles" / version / v["bundle"] for p, v in variants.items()}
    op("publish", *map(str, bundles.values()), "--repo", "repo", "--key", "team.key")
    doc = op("promote", MODEL, version, "--repo", "repo", "--channel", "stable")["documents"][0]
    assert doc["current"]["version"] == version
    assert {p: v["architecture"] for p, v in doc["current"]["variants"].items()} == {
        GUEST_PROFILE: "aarch64",
        OTHER_PROFILE: "x86_64",
    }
    return Release(version, weights, bundles)


def poll_in_guest(data: Path) -> dict[str, Any]:
    """``edgepack-agent run --once`` in the guest; the outcome for the one model."""
    outcomes = agent("run", "--once", "--data-dir", str(data))
    assert isinstance(outcomes, list) and len(outcomes) == 1, outcomes
    outcome: dict[str, Any] = outcomes[0]
    assert outcome["model"] == MODEL
    # The fields this test is about; the agent may report more.
    return {k: outcome.get(k) for k in ("model", "action", "version", "revision", "error")}


def current(data: Path) -> str:
    return os.readlink(data / "models" / MODEL / "current")


def journal(data: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((data / "state.json").read_text())["models"][MODEL]
    return doc


def requests_since(server: RepoServer, mark: int) -> list[str]:
    return [path for path, _ in server.requests[mark:]]


def test_agent_on_emulated_aarch64_installs_its_variant_updates_and_rolls_back(
    aarch64_guest: None, tmp_path: Path
) -> None:
    timings: dict[str, float] = {}
    clock = time.monotonic()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.monotonic()
        timings[step] = round(now - clock, 1)
        clock = now

    with guest_visible_dir(tmp_path) as base:
        # -- the host: keys and an empty repository with the model delegated to its team
        op = Operator(base)
        op("keys", "generate", "signing", "-o", "producer")
        op("keys", "generate", "signing", "-o", "team")
        op("repo", "init", "repo")
        op("repo", "add-model", "repo", MODEL, "--key", "team.pub")
        rng = np.random.default_rng(3)
        validation = base / "validation.npy"
        np.save(validation, rng.standard_normal((32, 16)).astype(np.float32))
        lap("host: keys, repo init")

        with serve_repository(base / "repo") as server:
            # -- the guest detects itself and enrols with --profile auto
            detected = agent("detect")
            assert detected["architecture"] == "aarch64"
            assert detected["profile"] == GUEST_PROFILE
            data = base / "device"
            enrolled = agent(
                "enroll",
                "--repo-url",
                server.url,
                "--root",
                str(base / "repo" / "public" / "metadata" / "1.root.json"),
                "--data-dir",
                str(data),
                "--model",
                MODEL,
                "--profile",
                "auto",
                "--trust",
                str(base / "producer.pub"),
            )
            config = (data / "config.toml").read_text()
            assert 'profile = "auto"' in config  # decided on the device at each poll
            assert 'architecture = ""' in config  # likewise: the guest's own, not the host's
            assert f'device_id = "{enrolled["device_id"]}"' in config
            device_pub = Path(enrolled["public_key"])
            assert (
                device_pub == data / "keys" / "device.pub" and (data / "keys/device.key").is_file()
            )
            lap("guest: detect, enroll")

            # -- v1, encrypted for the key the device made on aarch64 at enrolment
            v1 = build_and_publish(op, base, "1.0.0", 1, device_pub, validation)
            lap("host: build, publish, promote v1")
            out = poll_in_guest(data)
            lap("guest: run --once (install v1)")
            rev1 = v1.revision(GUEST_PROFILE)
            assert out == {
                "model": MODEL,
                "action": "installed",
                "version": "1.0.0",
                "revision": rev1,
                "error": None,
            }
            assert current(data) == rev1
            record = journal(data)["revisions"][rev1]
            assert record["target"] == f"models/{MODEL}/{v1.bundles[GUEST_PROFILE].name}"
            assert record["healthy"] is True  # the health check passed on aarch64
            # exactly one bundle downloaded: its own variant (served hash-prefixed), never x86's
            (only,) = server.bundle_requests()
            assert only.endswith(f".{v1.bundles[GUEST_PROFILE].name}")
            rev1_dir = data / "models" / MODEL / rev1
            assert not rev1_dir.stat().st_mode & 0o222  # installed read-only
            rev1_identity = (rev1_dir.stat().st_ino, rev1_dir.stat().st_mtime_ns)
            assert list((data / "downloads").iterdir()) == []

            # -- v2: the device moves forward and keeps v1 for rollback
            v2 = build_and_publish(op, base, "2.0.0", 2, device_pub, validation)
            lap("host: build, publish, promote v2")
            out = poll_in_guest(data)
            lap("guest: run --once (install v2)")
            rev2 = v2.revision(GUEST_PROFILE)
            assert (out["action"], out["version"], out["revision"]) == ("installed", "2.0.0", rev2)
            assert current(data) == rev2
            assert sorted(p.name for p in (data / "models" / MODEL).iterdir()) == sorted(
                [rev1, rev2, "current", ".manifests"]  # each revision's signed manifest
            )
            assert sorted(p.name for p in (data / "models" / MODEL / ".manifests").iterdir()) == [
                f"{r}.json" for r in sorted([rev1, rev2])
            ]
            _, second = server.bundle_requests()  # one more download: v2's aarch64 variant
            assert second.endswith(f".{v2.bundles[GUEST_PROFILE].name}")

            # -- the operator rolls the channel back; the device returns to v1 from its cache
            rolled = op("rollback", MODEL, "--repo", "repo", "--channel", "stable")["documents"][0]
            assert rolled["current"]["version"] == "1.0.0"
            assert rolled["previous"][0]["version"] == "2.0.0"
            lap("host: rollback")
            mark = len(server.requests)
            out = poll_in_guest(data)
            lap("guest: run --once (operator rollback)")
            assert out == {
                "model": MODEL,
                "action": "rolled-back",
                "version": "1.0.0",
                "revision": rev1,
                "error": None,
            }
            assert current(data) == rev1
            fetched = requests_since(server, mark)
            assert "/metadata/timestamp.json" in fetched  # it did poll the repository …
            assert any("stable.json" in p for p in fetched)  # … and read the new channel document
            assert [p for p in fetched if p.endswith(".epk")] == []  # … but downloaded no bundle
            assert list((data / "downloads").iterdir()) == []
            assert (rev1_dir.stat().st_ino, rev1_dir.stat().st_mtime_ns) == rev1_identity
            assert (data / "models" / MODEL / rev2).is_dir()  # v2 stays cached too

            # -- what the device reports, and what an application on it now loads
            status = agent("status", "--data-dir", str(data))
            entry = status["models"][MODEL]
            assert status["stale"] is False and status["device_id"] == enrolled["device_id"]
            assert (entry["version"], entry["revision"], entry["state"]) == (
                "1.0.0",
                rev1,
                "committed",
            )
            assert entry["last_action"] == "rolled-back" and entry["last_error"] is None
            assert entry["installed"] == sorted([rev1, rev2])
            assert entry["failed_releases"] == {}  # an operator's rollback is not a failure
            x = rng.standard_normal((8, 16)).astype(np.float32)
            np.save(base / "x.npy", x)
            machine = emulation.guest_python(
                INFER, MODEL, str(data), str(base / "x.npy"), str(base / "y.npy")
            )
            lap("guest: status, inference")
            assert machine.strip() == "aarch64"
            y = np.load(base / "y.npy")
            assert np.all(row_cosines(y, v1.weights(x)) > 0.99)  # v1's function (int8) …
            assert relative_error(y, v1.weights(x)) < 0.1
            assert relative_error(y, v2.weights(x)) > 0.5  # … not v2's

    print("emulated timings (not ARM performance figures):", json.dumps(timings))
