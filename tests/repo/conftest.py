"""Fixtures for repository tests: real keys, real bundles, a real HTTP server, ngclient.

Everything is real: bundles come from :func:`edgepack.bundle.pack`, metadata
is signed with real keys, devices are python-tuf's ``ngclient.Updater``
talking HTTP to ``edgepack.repo.make_server`` on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from tuf.ngclient.config import UpdaterConfig
from tuf.ngclient.updater import Updater

from edgepack import repo
from edgepack.bundle import pack
from edgepack.keys import (
    generate_recipient_key,
    generate_signing_key,
    write_keypair,
)
from edgepack.repo._tuf import Metadata, Signer, Targets
from edgepack.signing import ProducerKeySigner

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=timezone.utc)
"""Tests run at a fixed time (repository side) so expiry is under control."""


@dataclass
class Producer:
    """The keys a model team and the fleet bring: a producer key and a fleet recipient."""

    signing: ec.EllipticCurvePrivateKey
    fleet: x25519.X25519PrivateKey


@pytest.fixture(scope="session")
def producer() -> Producer:
    return Producer(generate_signing_key(), generate_recipient_key())


def make_bundle(
    out_dir: Path,
    producer: Producer,
    name: str,
    version: str,
    profile: str | None = None,
    architectures: tuple[str, ...] = ("aarch64",),
    payload: bytes = b"",
) -> Path:
    """A real bundle of a tiny ONNX model (Identity) whose unused initializer holds
    ``name/version/profile`` and ``payload``, so every bundle's bytes differ.

    The one place tests make bundles, so a change of the bundle API lands here.
    """
    model_dir = out_dir / f".src-{name}-{version}-{profile or 'any'}"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model.onnx").write_bytes(
        _tiny_onnx(b"onnx-bytes:" + f"{name}/{version}/{profile}".encode() + payload)
    )
    result = pack(
        model_dir,
        out_dir,
        name=name,
        version=version,
        recipients=[producer.fleet.public_key()],
        signer=ProducerKeySigner(producer.signing),
        profile=profile,
        architectures=architectures,
    )
    shutil.rmtree(model_dir)
    return result.path


def team_key(directory: Path, name: str) -> tuple[Path, Path]:
    """A model team's key pair (EC P-256, as ``edgepack keys generate signing`` makes)."""
    paths = write_keypair(directory / name, generate_signing_key())
    return paths.private, paths.public


@dataclass
class Repo:
    """A repository with one model ("digits") and its team key, unencrypted keys."""

    workdir: Path
    team_private: Path
    team_public: Path
    bundles: Path

    def publish(self, *paths: Path, **kwargs: object) -> repo.Result:
        options: dict[str, object] = {
            "key": str(self.team_private),
            "passphrase": repo.no_passphrase,
            "now": NOW,
        }
        options.update(kwargs)
        return repo.publish(self.workdir, list(paths), **options)  # type: ignore[arg-type]


@pytest.fixture
def digits_repo(tmp_path: Path) -> Repo:
    workdir = tmp_path / "repo"
    repo.init(workdir, passphrase=None, now=NOW)
    private, public = team_key(tmp_path / "teams", "digits")
    repo.add_model(workdir, "digits", public, passphrase=repo.no_passphrase, now=NOW)
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    return Repo(workdir, private, public, bundles)


@dataclass
class Server:
    """A running development server for one repository."""

    url: str
    workdir: Path


@pytest.fixture
def server(digits_repo: Repo) -> Iterator[Server]:
    httpd = repo.make_server(digits_repo.workdir, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{httpd.server_address[1]}", digits_repo.workdir)
    finally:
        httpd.shutdown()
        httpd.server_close()


def new_client(
    server: Server,
    home: Path,
    *,
    root: bytes | None = None,
    when: datetime | None = None,
    config: UpdaterConfig | None = None,
) -> Updater:
    """A device: ngclient trusting the repository's first root (or its cached one
    when ``home`` was used before, like a device that polled earlier)."""
    metadata = home / "metadata"
    metadata.mkdir(parents=True, exist_ok=True)
    (home / "targets").mkdir(exist_ok=True)
    trusted = (
        root if root is not None else (server.workdir / "public/metadata/1.root.json").read_bytes()
    )
    if not (metadata / "root.json").exists():
        (metadata / "root.json").write_bytes(trusted)
    updater = Updater(
        metadata_dir=str(metadata),
        metadata_base_url=f"{server.url}/metadata/",
        target_base_url=f"{server.url}/targets/",
        target_dir=str(home / "targets"),
        config=config,
        bootstrap=None,  # the device's cached root.json, written at enrolment
    )
    set_client_time(updater, when or NOW + timedelta(minutes=1))
    return updater


def set_client_time(updater: Updater, when: datetime) -> None:
    """Move the device's clock (ngclient checks expiry against this reference time)."""
    updater._trusted_set.reference_time = when


def tree_hash(workdir: Path) -> str:
    """A digest of every file under the working directory (names, modes and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(workdir.rglob("*")):
        if path.is_file() and path.name != ".publish.lock":
            digest.update(str(path.relative_to(workdir)).encode() + b"\0")
            digest.update(oct(path.stat().st_mode).encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def forge(
    workdir: Path,
    role: str,
    mutate: Callable[[Metadata[Targets]], None],
    signers: list[Signer],
    *,
    parent: str = "targets",
    files: dict[str, bytes] | None = None,
) -> None:
    """Act as an attacker holding ``signers``: publish a changed ``role`` through the
    repository's honest online roles (snapshot, timestamp), bypassing our own checks.

    What devices then accept is up to TUF alone.
    """
    from copy import deepcopy

    from edgepack.repo._settings import RepoPaths, Settings
    from edgepack.repo._store import Store
    from edgepack.repo._tuf import TargetFile

    paths = RepoPaths(workdir)
    store = Store(paths, Settings.load(paths), now=NOW, passphrase=repo.no_passphrase)
    md = deepcopy(store.role(role, parent=parent)) if store.has_role(role) else None
    if md is None:
        from edgepack.repo._tuf import Metadata as Md
        from edgepack.repo._tuf import Targets as Tg

        md = Md(Tg(expires=NOW))
    mutate(md)
    for path, data in (files or {}).items():
        store.add_file(TargetFile.from_data(path, data), data)
    store.stage(role, md, signers)
    store.commit()


def signer_from_pem(path: Path) -> Signer:
    """A TUF signer for an unencrypted PEM private key file."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from edgepack.repo._tuf import CryptoSigner

    return CryptoSigner(load_pem_private_key(path.read_bytes(), None))


def _tiny_onnx(filler: bytes) -> bytes:
    from onnx import TensorProto, helper

    pad = helper.make_tensor("pad", TensorProto.UINT8, [len(filler)], filler, raw=True)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [pad],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data: bytes = model.SerializeToString()
    return data
