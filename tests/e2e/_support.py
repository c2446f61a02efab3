"""The real parts of the end-to-end story: commands run as a user runs them, servers, devices.

Every repository and agent step goes through ``python -m edgepack.cli`` or
``python -m device_agent`` in a subprocess with ``--json``; only what a user
does from Python (``edgepack.build.api.build``, re-packing a bundle with
``edgepack.bundle``, ``device_agent.open_session``) runs in the test process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tests.servers import free_port, nginx_server, wait_for_port

MODEL = "digits"
CHANNEL = "stable"
PASSPHRASE = "e2e-passphrase"
# x86-64 both: this host is x86-64 (aarch64 runs under emulation in tests/hw).
PROFILES: tuple[str, str] = ("intel-nuc", "generic-x86_64")
DEVICES: tuple[str, str] = ("device-a", "device-b")
AIRGAP_DEVICE = "device-c"
COMMAND_TIMEOUT_S = 300

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


class CommandError(AssertionError):
    """A command exited non-zero; the message carries its stderr."""


def command_env() -> dict[str, str]:
    """The environment of every command: the key passphrase, no debug tracebacks."""
    env = dict(os.environ, EDGEPACK_PASSPHRASE=PASSPHRASE, EDGEPACK_DEBUG="0")
    env.pop("EDGEPACK_DATA_DIR", None)
    return env


def run_json(program: str, *args: str | Path) -> Any:
    """Run ``edgepack`` or ``edgepack-agent`` with ``args`` and ``--json``; the parsed output."""
    module = {"edgepack": "edgepack.cli", "edgepack-agent": "device_agent"}[program]
    argv = [sys.executable, "-m", module, *map(str, args), "--json"]
    proc = subprocess.run(
        argv,
        env=command_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        timeout=COMMAND_TIMEOUT_S,
    )
    if proc.returncode != 0:
        shown = " ".join(map(str, args))
        raise CommandError(
            f"{program} {shown} exited {proc.returncode}\nstdout: {proc.stdout}\n"
            f"stderr: {proc.stderr}"
        )
    return json.loads(proc.stdout) if proc.stdout.strip() else None


def edgepack(*args: str | Path) -> Any:
    """``edgepack ARGS --json``."""
    return run_json("edgepack", *args)


def agent(*args: str | Path) -> Any:
    """``edgepack-agent ARGS --json``."""
    return run_json("edgepack-agent", *args)


# ----------------------------------------------------------------------- keys
@dataclass(frozen=True)
class Keys:
    """Key files made with ``edgepack keys generate`` (private ones passphrase-protected)."""

    root: Path

    def private(self, name: str) -> Path:
        return self.root / f"{name}.key"

    def public(self, name: str) -> Path:
        return self.root / f"{name}.pub"

    @property
    def producer_pub(self) -> Path:
        return self.public("producer")


def generate_keys(root: Path) -> Keys:
    """Producer and model-team signing keys, one recipient key per device."""
    root.mkdir(parents=True)
    for name in ("producer", "team-digits"):
        edgepack("keys", "generate", "signing", "-o", root / name)
    for name in (*DEVICES, AIRGAP_DEVICE):
        edgepack("keys", "generate", "recipient", "-o", root / name)
    return Keys(root)


# ---------------------------------------------------------------------- model
@dataclass(frozen=True)
class Digits:
    """scikit-learn's bundled digits, split; the held-out part never trains a model."""

    x_train: FloatArray
    y_train: IntArray
    x_test: FloatArray
    y_test: IntArray


def load_digits_split() -> Digits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    return Digits(x_train, y_train, x_test, y_test)


def train(data: Digits, seed: int) -> Any:
    """A tiny MLP; ``seed`` makes v1 and v3 genuinely different models."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    model = MLPClassifier(hidden_layer_sizes=(32,), max_iter=300, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(data.x_train, data.y_train)
    return model


@dataclass(frozen=True)
class Releases:
    """The bundles of the story, built once per session; ``NAME-VERSION-PROFILE.epk`` each."""

    v1: list[Path]
    v2_broken: list[Path]
    v3: list[Path]
    digits: Digits
    keys: Keys
    probe: int  # a held-out sample both good models classify correctly


def build_release(model: Any, version: str, keys: Keys, data: Digits, out_dir: Path) -> list[Path]:
    """``edgepack.build.api.build`` for both profiles, dynamic int8, for every device key."""
    from edgepack.build.api import build
    from edgepack.keys import load_recipient_public_key, load_signing_key

    result = build(
        model,
        name=MODEL,
        version=version,
        hw=list(PROFILES),
        out_dir=out_dir,
        recipients=[load_recipient_public_key(keys.public(d)) for d in (*DEVICES, AIRGAP_DEVICE)],
        signer=load_signing_key(keys.private("producer")),
        quantize="dynamic",
        max_accuracy_drop=0.02,
        validation=data.x_test[:200],
        labels=data.y_test[:200],
    )
    bundles = [Path(p) for p in result.bundles]
    assert sorted(b.name for b in bundles) == sorted(
        f"{MODEL}-{version}-{p}.epk" for p in PROFILES
    ), bundles
    return bundles


def assert_broken(model_path: Path, data: Digits) -> None:
    """The corrupted model really is wrong: most held-out digits get the wrong label."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    labels = session.run(None, {session.get_inputs()[0].name: data.x_test})[0]
    accuracy = float(np.mean(np.asarray(labels).reshape(-1) == data.y_test))
    assert accuracy < 0.5, f"the corrupted model still scores {accuracy:.2f}"


def broken_release(
    v1: Sequence[Path], keys: Keys, data: Digits, work: Path, version: str
) -> list[Path]:
    """v1's model with corrupted weights but v1's golden health set, validly signed.

    Every signature and hash checks out; only the agent's health check, which
    replays the golden inputs recorded for v1, can see the outputs are wrong.
    """
    import onnx
    from onnx import numpy_helper

    from edgepack.bundle import pack, read_info, unpack
    from edgepack.keys import (
        load_recipient_private_key,
        load_recipient_public_key,
        load_signing_key,
    )
    from edgepack.signing import load_trust_policy

    key = load_recipient_private_key(keys.private(DEVICES[0]))
    policy = load_trust_policy(keys.producer_pub)
    recipients = [load_recipient_public_key(keys.public(d)) for d in (*DEVICES, AIRGAP_DEVICE)]
    out: list[Path] = []
    for bundle in v1:
        info = read_info(bundle)
        staging = work / "broken" / (info.profile or "any")
        staging.parent.mkdir(parents=True, exist_ok=True)
        unpack(bundle, staging, recipient_key=key, policy=policy)
        meta = info.metadata
        assert meta.get("health"), f"{bundle} has no health set to replay"
        model_path = staging / str(meta["model"]["path"])
        proto = onnx.load(str(model_path))
        # Shift every weight matrix and bias row by one column: the same shapes and
        # dtypes (int8 after dynamic quantisation, float32 biases), scrambled neurons.
        changed = 0
        for init in proto.graph.initializer:
            array = numpy_helper.to_array(init)
            if array.ndim == 2 and array.shape[-1] > 1:
                init.CopyFrom(numpy_helper.from_array(np.roll(array, 1, axis=-1), init.name))
                changed += 1
        assert changed, f"no weight matrix to corrupt in {bundle}"
        model_path.chmod(0o644)
        model_path.unlink()
        onnx.save(proto, str(model_path))
        assert_broken(model_path, data)
        result = pack(
            staging,
            work / version,
            name=MODEL,
            version=version,
            recipients=recipients,
            signer=load_signing_key(keys.private("producer")),
            profile=info.profile,
            architectures=info.architectures,
            model_info=meta["model"],
            quantization=meta.get("quantization"),
            provenance=meta.get("provenance"),
            health=meta.get("health"),
        )
        out.append(Path(result.path))
    return out


# ----------------------------------------------------------------- repository
def init_repository(workdir: Path, keys: Keys, v1: Sequence[Path]) -> None:
    """``repo init``, ``repo add-model``, ``publish`` v1, ``promote`` it to stable."""
    edgepack("repo", "init", workdir)
    edgepack("repo", "add-model", workdir, MODEL, "--key", keys.public("team-digits"))
    publish(workdir, keys, v1)
    promote(workdir, "1.0.0")
    assert (workdir / "public" / "metadata" / "1.root.json").is_file()
    assert (workdir / "public" / "metadata" / "timestamp.json").is_file()


def publish(workdir: Path, keys: Keys, bundles: Sequence[Path]) -> None:
    """``edgepack publish`` under the model team's delegated role."""
    edgepack("publish", *bundles, "--repo", workdir, "--key", keys.private("team-digits"))


def promote(workdir: Path, version: str, rollout: float | None = None) -> dict[str, Any]:
    """``edgepack promote``; the channel document it published."""
    extra = [] if rollout is None else ["--rollout", repr(rollout)]
    out = edgepack("promote", MODEL, version, "--repo", workdir, "--channel", CHANNEL, *extra)
    return channel_document(out)


def channel_document(output: Any) -> dict[str, Any]:
    """The one channel document a promote/rollback/revoke reports."""
    docs = [d for d in output["documents"] if d["model"] == MODEL and d["channel"] == CHANNEL]
    assert len(docs) == 1, output
    doc: dict[str, Any] = docs[0]
    return doc


def bundle_files(public: Path, version: str) -> list[Path]:
    """The served target files of one version (consistent-snapshot names included)."""
    return sorted((public / "targets").rglob(f"*{MODEL}-{version}-*.epk"))


# -------------------------------------------------------------------- servers
SERVERS = ("edgepack-repo-serve", "nginx")


@contextlib.contextmanager
def edgepack_repo_serve(workdir: Path) -> Iterator[str]:
    """``edgepack repo serve WORKDIR`` on a free loopback port; the base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgepack.cli", "repo", "serve", str(workdir), "--port", str(port)],
        env=command_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        try:
            wait_for_port(port, timeout=30)
        except TimeoutError:
            proc.kill()
            _, err = proc.communicate(timeout=10)
            raise AssertionError(f"edgepack repo serve did not start: {err.decode()}") from None
        assert proc.poll() is None
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


@contextlib.contextmanager
def serve(kind: str, workdir: Path) -> Iterator[str]:
    """Serve the repository's public tree with ``kind``; the base URL."""
    if kind == "nginx":
        with nginx_server(workdir / "public") as url:
            yield url
    elif kind == "edgepack-repo-serve":
        with edgepack_repo_serve(workdir) as url:
            yield url
    else:
        raise ValueError(kind)


# -------------------------------------------------------------------- devices
@dataclass
class Device:
    """One enrolled device: its data directory, profile and id."""

    name: str
    data: Path
    profile: str
    device_id: str = ""

    @property
    def model_dir(self) -> Path:
        return self.data / "models" / MODEL

    @property
    def downloads(self) -> Path:
        return self.data / "downloads"

    def current(self) -> str | None:
        """The revision ``DATA/models/digits/current`` points at (None when there is none)."""
        link = self.model_dir / "current"
        if not link.is_symlink():
            return None
        target = os.readlink(link)
        assert "/" not in target, f"current points outside the model directory: {target}"
        assert (self.model_dir / target).is_dir(), f"current points at a missing {target}"
        return target

    def installed(self) -> list[str]:
        """Revision directories on disk (the ``current`` link and temporaries excluded)."""
        if not self.model_dir.is_dir():
            return []
        return sorted(
            p.name
            for p in self.model_dir.iterdir()
            if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
        )


def enroll(
    name: str, data: Path, profile: str, repo_url: str, root_json: Path, keys: Keys
) -> Device:
    """``edgepack-agent enroll`` with the device's recipient key and the producer's key."""
    out = agent(
        "enroll",
        "--repo-url",
        repo_url,
        "--root",
        root_json,
        "--data-dir",
        data,
        "--model",
        MODEL,
        "--channel",
        CHANNEL,
        "--profile",
        profile,
        "--trust",
        keys.producer_pub,
        "--recipient-key",
        keys.private(name),
    )
    device_id = str(out["device_id"])
    assert device_id.startswith("dev-"), out
    return Device(name, data, profile, device_id)


def poll(device: Device) -> dict[str, Any]:
    """``edgepack-agent run --once``; the outcome for the one followed model.

    A refusal exits non-zero: the exit code must be the one the outcome names.
    """
    argv = [sys.executable, "-m", "device_agent", "run", "--once", "--data-dir", device.data]
    proc = subprocess.run(
        [*map(str, argv), "--json"],
        env=command_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        timeout=COMMAND_TIMEOUT_S,
    )
    outcomes = json.loads(proc.stdout) if proc.stdout.strip() else None
    assert isinstance(outcomes, list) and len(outcomes) == 1, (outcomes, proc.stderr)
    assert proc.returncode == outcomes[0].get("exit_code", 0), (proc.returncode, proc.stderr)
    outcome: dict[str, Any] = outcomes[0]
    assert outcome["model"] == MODEL, outcome
    return outcome


def status(device: Device) -> dict[str, Any]:
    """``edgepack-agent status``'s entry for the model."""
    doc = agent("status", "--data-dir", device.data)
    entry: dict[str, Any] = doc["models"][MODEL]
    return entry


def predict(device: Device, x: FloatArray) -> IntArray:
    """Labels from the device's active model, through the application API."""
    from device_agent import open_session

    session = open_session(MODEL, data_dir=device.data)
    outputs = session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})
    return np.asarray(outputs[0]).reshape(-1).astype(np.int64)


def assert_predicts(device: Device, releases: Releases) -> None:
    """The active model classifies a held-out digit correctly, and most of the held-out set."""
    digits = releases.digits
    i = releases.probe
    got = predict(device, digits.x_test[i : i + 1])
    assert got.tolist() == [int(digits.y_test[i])], (
        f"{device.name} predicted {got.tolist()} for a held-out {digits.y_test[i]}"
    )
    accuracy = float(np.mean(predict(device, digits.x_test) == digits.y_test))
    assert accuracy >= 0.9, f"{device.name}: held-out accuracy {accuracy:.3f}"


def copy_tree(src: Path, dest: Path) -> None:
    """Copy a repository's public tree onto a "USB stick" (rsync-like: add and overwrite)."""
    shutil.copytree(src, dest, dirs_exist_ok=True)
