"""Per-device key envelopes end to end: the project's own repository, ``edgepack keys wrap``
and ``edgepack fleet revoke-device --repo`` as an operator runs them, and real agents.

Releases are packed for a publisher key no device holds, so the bundle names no
device: each device opens a release only through its own envelope. A revoked
device keeps the model it runs, cannot open the next release, and says why.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from device_agent import enroll, open_session, status
from device_agent.slots import Slots
from edgepack import bundle, keys, repo
from edgepack.cli import main
from edgepack.signing import ProducerKeySigner
from tests.agent._support import MODEL, fast_limits, make_model_dir
from tests.agent.conftest import poll

X = np.arange(4, dtype=np.float32).reshape(1, 4)


@dataclass
class Site:
    base: Path
    workdir: Path
    url: str
    producer: ec.EllipticCurvePrivateKey
    publisher: x25519.X25519PrivateKey

    def release(self, version: str, scale: float) -> Path:
        src = self.base / f"src-{version}"
        shutil.rmtree(src, ignore_errors=True)
        health = make_model_dir(src, scale, pad_bytes=256 * 1024)
        path = bundle.pack(
            src,
            self.base / "bundles",
            name=MODEL,
            version=version,
            recipients=[self.publisher.public_key()],
            signer=ProducerKeySigner(self.producer),
            health=health,
        ).path
        repo.publish(
            self.workdir,
            [path],
            key=str(self.base / "team.key"),
            passphrase=repo.no_passphrase,
            channel="stable",
        )
        return path

    def device(self, name: str) -> tuple[Path, str]:
        data = self.base / name
        result = enroll.enroll(
            data,
            repo_url=self.url,
            root=self.workdir / "public/metadata/1.root.json",
            models=[MODEL],
            trust=self.base / "producer.pub",
            limits=fast_limits(),
        )
        records = self.base / "records"
        records.mkdir(exist_ok=True)
        shutil.copy(data / "keys" / "enrolment.json", records / f"{result.device_id}.json")
        return data, result.device_id


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    workdir = tmp_path / "repo"
    repo.init(workdir, passphrase=None)
    keys.write_keypair(tmp_path / "team", keys.generate_signing_key())
    repo.add_model(workdir, MODEL, tmp_path / "team.pub", passphrase=repo.no_passphrase)
    producer = keys.generate_signing_key()
    keys.write_keypair(tmp_path / "producer", producer)
    publisher = keys.generate_recipient_key()
    keys.write_recipient_keypair(tmp_path / "publisher", publisher)
    httpd = repo.make_server(workdir, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield Site(
            tmp_path, workdir, f"http://127.0.0.1:{httpd.server_address[1]}", producer, publisher
        )
    finally:
        httpd.shutdown()
        httpd.server_close()


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code = main(list(args))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def _wrap(capsys: pytest.CaptureFixture[str], site: Site, bundle_path: Path) -> str:
    return _cli(
        capsys,
        "keys",
        "wrap",
        str(bundle_path),
        "--repo",
        str(site.workdir),
        "--open-with",
        str(site.base / "publisher.key"),
        "--devices",
        str(site.base / "records"),
    )


def test_devices_install_from_their_envelopes_and_a_revoked_one_keeps_its_model(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    kept_data, _ = site.device("a")
    revoked_data, revoked_id = site.device("b")
    v1 = site.release("1.0.0", 2.0)
    for data in (kept_data, revoked_data):  # before its envelope: nothing, and why
        out = poll(data)
        assert out.action == "error" and "no key envelope" in str(out.error), out
    _wrap(capsys, site, v1)
    for data in (kept_data, revoked_data):
        assert poll(data).action == "installed"
        assert np.allclose(open_session(MODEL, data_dir=data).run(None, {"X": X})[0], X * 2 + 1)

    _cli(capsys, "fleet", "revoke-device", revoked_id, "--repo", str(site.workdir))
    v2 = site.release("2.0.0", 3.0)
    _wrap(capsys, site, v2)
    assert poll(kept_data).action == "installed"
    assert str(Slots(kept_data, MODEL).current()).startswith("2.0.0-")

    running = Slots(revoked_data, MODEL).current()
    out = poll(revoked_data)
    assert out.action == "error" and revoked_id in str(out.error), out
    assert Slots(revoked_data, MODEL).current() == running  # it keeps what it runs
    assert str(running).startswith("1.0.0-")
    assert np.allclose(open_session(MODEL, data_dir=revoked_data).run(None, {"X": X})[0], X * 2 + 1)
    doc = status.load(revoked_data)["models"][MODEL]
    assert "no key envelope" in str(doc["last_error"])
    # it stopped after the bundle's first kilobytes instead of downloading the release
    parts = list((revoked_data / "downloads").glob("*.part"))
    assert all(p.stat().st_size < v2.stat().st_size // 4 for p in parts), parts
