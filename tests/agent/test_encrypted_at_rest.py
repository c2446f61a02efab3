"""Models stay encrypted at rest: no plaintext model byte on disk, one write per install.

An ``encrypted`` revision keeps the downloaded bundle (linked into place, never
copied) and its content key sealed with the device's storage key; the health
check and ``open_session`` decrypt into memory. Each test here has a control
(the same steps in ``plain`` mode, or before the fault) that shows the check
would catch the defect it guards against.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from device_agent import atrest, open_session
from device_agent.errors import CorruptRevisionError, EncryptedAtRestError
from device_agent.slots import Slots
from device_agent.state import Journal
from edgepack.bundle import read_info
from edgepack.errors import KeyFileError
from tests.agent._support import MODEL, World
from tests.agent.conftest import poll

X = np.arange(4, dtype=np.float32).reshape(1, 4)
PAD = 4 * 1024 * 1024  # incompressible weights, so write volumes are measurable


def _plaintext_needles(world: World, version: str) -> list[bytes]:
    """Distinctive windows of the release's plaintext payload: model weights and golden set."""
    src = world.base / f"src-{version}"
    needles: list[bytes] = []
    for rel in ("model.onnx", "health/golden.npz"):
        raw = (src / rel).read_bytes()
        for start in (len(raw) // 3, len(raw) // 2, len(raw) - 80):
            needles.append(raw[start : start + 48])
    return needles


def _files_under(*roots: Path) -> list[Path]:
    found: list[Path] = []
    for root in roots:
        for dirpath, _, files in os.walk(root):
            found.extend(Path(dirpath) / f for f in files)
    return found


def _holding(paths: list[Path], needles: list[bytes]) -> list[str]:
    hits = []
    for path in paths:
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        if any(n in raw for n in needles):
            hits.append(str(path))
    return hits


def _open_files() -> list[Path]:
    """The regular files this process holds open (the test runs open_session in-process)."""
    found: list[Path] = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the descriptor listdir itself used
            continue
        if target.is_file():
            found.append(target)
    return found


def _enrolled(world: World, tmp_path: Path, at_rest: str) -> Path:
    data = tmp_path / f"data-{at_rest}"
    world.enroll(data, at_rest=at_rest)
    return data


@pytest.mark.parametrize("at_rest", ["encrypted", "plain"])
def test_no_plaintext_on_disk_after_install_health_check_and_open(
    world: World, tmp_path: Path, at_rest: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.publish("1.0.0", 2.0, pad_bytes=PAD)
    data = _enrolled(world, tmp_path, at_rest)
    # Where the agent, its children and onnxruntime put temporary files, as the CLI
    # confines them (config.confine_temp), undone after the test.
    tmp, cache = data / "tmp", data / "cache"
    tmp.mkdir(exist_ok=True)
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setattr(tempfile, "tempdir", None)
    assert poll(data).action == "installed"
    session = open_session(MODEL, data_dir=data)
    assert np.allclose(session.run(None, {"X": X})[0], X * 2.0 + 1.0)
    needles = _plaintext_needles(world, "1.0.0")
    on_disk = _holding(_files_under(data, tmp, cache) + _open_files(), needles)
    if at_rest == "encrypted":
        assert on_disk == [], f"plaintext model bytes on disk: {on_disk}"
        revision = Slots(data, MODEL).current()
        assert revision is not None
        assert sorted(p.name for p in Slots(data, MODEL).revision_dir(revision).iterdir()) == [
            atrest.BUNDLE_FILE,
            atrest.KEY_FILE,
        ]
    else:  # the control: the grep finds a plain revision's weights
        assert any("model.onnx" in hit for hit in on_disk), on_disk
    del session


def _written_by_install(world: World, data: Path) -> int:
    """Bytes the agent process wrote (write syscalls) during one installing poll."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from device_agent import config, loop\n"
        "from device_agent.agent import Agent\n"
        "agent = Agent(config.load(Path(sys.argv[1])))\n"
        "def wchar():\n"
        "    for line in open('/proc/self/io'):\n"
        "        if line.startswith('wchar:'):\n"
        "            return int(line.split()[1])\n"
        "before = wchar()\n"
        "out = loop.poll_once(agent)[0]\n"
        "assert out.action == 'installed', out\n"
        "print(wchar() - before)\n"
    )
    repo_root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", script, str(data)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(repo_root)),
        timeout=120,
        check=True,
    )
    return int(proc.stdout.strip().splitlines()[-1])


def test_an_encrypted_install_writes_each_byte_once(world: World, tmp_path: Path) -> None:
    bundle = world.publish("1.0.0", 2.0, pad_bytes=PAD)
    size = bundle.stat().st_size
    encrypted = _written_by_install(world, _enrolled(world, tmp_path, "encrypted"))
    plain = _written_by_install(world, _enrolled(world, tmp_path, "plain"))
    assert encrypted < 1.15 * size, (encrypted, size)
    assert plain > 1.8 * size, (plain, size)  # the control: ciphertext, then plaintext


def test_the_download_is_linked_into_the_revision_not_copied(world: World, data: Path) -> None:
    world.publish("1.0.0", 2.0)
    assert poll(data).action == "installed"
    revision = str(Slots(data, MODEL).current())
    kept = Slots(data, MODEL).revision_dir(revision) / atrest.BUNDLE_FILE
    assert kept.read_bytes() == world.bundles["1.0.0"].read_bytes()
    assert kept.stat().st_nlink == 1  # the download's own name is gone
    assert list((data / "downloads").iterdir()) == []


def _flip(path: Path, offset: int) -> None:
    path.parent.chmod(0o750)
    path.chmod(0o640)
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def test_a_tampered_ciphertext_is_refused_and_the_agent_reverts(world: World, data: Path) -> None:
    world.publish("1.0.0", 2.0)
    poll(data)
    v1 = str(Slots(data, MODEL).current())
    world.publish("2.0.0", 3.0)
    assert poll(data).action == "installed"
    v2 = str(Slots(data, MODEL).current())
    assert np.allclose(open_session(MODEL, data_dir=data).run(None, {"X": X})[0], X * 3.0 + 1.0)
    bundle_path = Slots(data, MODEL).revision_dir(v2) / atrest.BUNDLE_FILE
    info = read_info(bundle_path)
    _flip(bundle_path, info.payload_offset + info.payload_length // 2)  # inside payload.enc
    with pytest.raises(CorruptRevisionError, match="fails authentication"):
        open_session(MODEL, data_dir=data)
    out = poll(data)  # the scrub finds it: back to v1 at once, then 2.0.0 afresh
    assert out.action == "installed", out
    assert Slots(data, MODEL).current() == v2
    assert np.allclose(open_session(MODEL, data_dir=data).run(None, {"X": X})[0], X * 3.0 + 1.0)
    repairs = Journal.load(data).model(MODEL).repairs
    assert repairs and "damaged" in repairs[-1] and v1 in repairs[-1]


def test_a_sealed_key_moved_to_another_revision_does_not_open(world: World, data: Path) -> None:
    world.publish("1.0.0", 2.0)
    poll(data)
    v1 = str(Slots(data, MODEL).current())
    world.publish("2.0.0", 3.0)
    poll(data)
    v2 = str(Slots(data, MODEL).current())
    slots = Slots(data, MODEL)
    dest = slots.revision_dir(v2) / atrest.KEY_FILE
    dest.parent.chmod(0o750)
    dest.chmod(0o640)
    dest.write_bytes((slots.revision_dir(v1) / atrest.KEY_FILE).read_bytes())
    with pytest.raises(CorruptRevisionError, match="does not open"):
        open_session(MODEL, data_dir=data)


def test_a_lost_storage_key_is_said_plainly(world: World, data: Path) -> None:
    world.publish("1.0.0", 2.0)
    poll(data)
    (data / "models" / ".storage.key").unlink()
    with pytest.raises(KeyFileError, match="cannot be decrypted"):
        open_session(MODEL, data_dir=data)


def test_an_encrypted_model_has_no_path_to_hand_out(world: World, data: Path) -> None:
    from device_agent import active_model_path

    world.publish("1.0.0", 2.0)
    poll(data)
    with pytest.raises(EncryptedAtRestError, match="no model file to open by path"):
        active_model_path(MODEL, data_dir=data)


def test_a_tpm_enrolled_device_installs_and_opens_with_keys_only_the_tpm_unseals(
    world: World, tmp_path: Path
) -> None:
    from device_agent import enroll as enroll_mod
    from tests.agent._support import fast_limits
    from tests.agent._swtpm import SwTpm, skip_unless_available

    skip_unless_available()
    world.publish("1.0.0", 2.0)
    data = tmp_path / "data-tpm"
    with SwTpm(tmp_path / "tpm") as tpm:
        enroll_mod.enroll(
            data,
            repo_url=world.server.url,
            root=world.root_json,
            models=[MODEL],
            trust=world.producer_pub,
            recipient_key=world.fleet_key_path,
            limits=fast_limits(),
            key_protection="tpm",
            tpm_tcti=tpm.tcti,
        )
        assert poll(data).action == "installed"
        assert np.allclose(open_session(MODEL, data_dir=data).run(None, {"X": X})[0], X * 2 + 1)
        assert not (data / "models" / ".storage.key").exists()
        assert (data / "models" / ".storage.key.tpm").is_file()
    # The TPM gone (the disk in another machine): the model cannot be opened.
    with pytest.raises(KeyFileError):
        open_session(MODEL, data_dir=data)
