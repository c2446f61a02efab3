"""The ``edgepack keys|pack|verify|inspect`` commands as a person and a script use them."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edgepack.cli import main
from tests.bundle import surgery
from tests.bundle.conftest import write_linear_model

PACK_V1 = (
    "pack", "model", "--name", "linear", "--version", "1.0.0",
    "--recipient", "device.pub", "--sign-key", "producer.key", "-o", "out",
)  # fmt: skip


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def workspace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EDGEPACK_PASSPHRASE", "correct horse")
    assert run(capsys, "keys", "generate", "signing", "-o", "producer")[0] == 0
    assert run(capsys, "keys", "generate", "recipient", "-o", "device")[0] == 0
    write_linear_model(tmp_path / "model")
    return tmp_path


def test_keys_are_private_and_encrypted(workspace: Path) -> None:
    for name in ("producer.key", "device.key"):
        mode = stat.S_IMODE((workspace / name).stat().st_mode)
        assert mode == 0o600
        assert b"ENCRYPTED PRIVATE KEY" in (workspace / name).read_bytes()
    assert b"PUBLIC KEY" in (workspace / "device.pub").read_bytes()


def test_pack_inspect_verify(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, *PACK_V1, "--json")
    assert code == 0
    packed = json.loads(out)
    bundle = Path(packed["path"])
    assert bundle.name == "linear-1.0.0-any.epk"
    code, out, _ = run(capsys, "inspect", str(bundle), "--json")
    meta = json.loads(out)["metadata"]
    assert meta["model"]["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["N", 64]}]
    code, out, _ = run(
        capsys,
        "verify",
        str(bundle),
        "--trust",
        "producer.pub",
        "--recipient-key",
        "device.key",
        "--json",
    )
    assert code == 0 and json.loads(out)["payload_checked"] is True
    code, out, _ = run(capsys, "inspect", str(bundle))
    assert "linear 1.0.0" in out and "model.onnx.data" in out


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["verify", "producer.pub", "--trust", "producer.pub"], 3, "not an edgepack bundle"),
        (["verify", "BUNDLE", "--trust", "device.pub"], 5, "not an EC P-256 public key"),
        (
            ["verify", "BUNDLE", "--trust", "producer.pub", "--recipient-key", "producer.key"],
            5,
            "not an X25519",
        ),
        (
            [
                "pack",
                "model",
                "--name",
                "Bad Name",
                "--version",
                "1",
                "--recipient",
                "device.pub",
                "--sign-key",
                "producer.key",
                "-o",
                "o",
            ],
            3,
            "invalid model name",
        ),
        (
            [
                "pack",
                "model",
                "--name",
                "m",
                "--version",
                "1",
                "--recipient",
                "producer.pub",
                "--sign-key",
                "producer.key",
                "-o",
                "o",
            ],
            5,
            "not an X25519",
        ),
        (
            [
                "pack",
                "model",
                "--name",
                "m",
                "--version",
                "1",
                "--recipient",
                "device.pub",
                "--sign-key",
                "device.key",
                "-o",
                "o",
            ],
            5,
            "not an EC P-256",
        ),
        (["inspect", "missing.epk"], 3, "cannot read"),
    ],
)
def test_bad_input_is_one_line_and_a_meaningful_exit(
    workspace: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, message: str
) -> None:
    assert run(capsys, *PACK_V1)[0] == 0
    argv = [a.replace("BUNDLE", "out/linear-1.0.0-any.epk") for a in argv]
    before = sorted(str(p) for p in workspace.rglob("*"))
    got, _out, err = run(capsys, *argv)
    assert got == code, err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert sorted(str(p) for p in workspace.rglob("*")) == before


def test_tampered_bundle_exits_4(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, *PACK_V1)[0] == 0
    bundle = workspace / "out" / "linear-1.0.0-any.epk"
    offset, _ = surgery.payload_segments(bundle)[0]
    flipped = surgery.flip(bundle, offset + 3)
    code, _, err = run(
        capsys, "verify", str(flipped), "--trust", "producer.pub", "--recipient-key", "device.key"
    )
    assert code == 4 and "cannot decrypt" in err


def test_loose_permissions_and_wrong_passphrase(
    workspace: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    os.chmod(workspace / "producer.key", 0o644)
    code, _, err = run(capsys, *PACK_V1)
    assert code == 5 and "chmod 600" in err
    os.chmod(workspace / "producer.key", 0o600)
    monkeypatch.setenv("EDGEPACK_PASSPHRASE", "wrong")
    code, _, err = run(capsys, *PACK_V1)
    assert code == 5 and "wrong passphrase" in err
    assert not (workspace / "out").exists()  # refused before anything was written
    monkeypatch.setenv("MY_PASS", "correct horse")
    code, _, _ = run(capsys, *PACK_V1, "--passphrase-env", "MY_PASS")
    assert code == 0
    assert [p.name for p in (workspace / "out").iterdir()] == ["linear-1.0.0-any.epk"]


def test_no_passphrase_and_no_terminal_is_an_error_not_a_hang(workspace: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "EDGEPACK_PASSPHRASE"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgepack.cli",
            "pack",
            "model",
            "--name",
            "m",
            "--version",
            "1",
            "--recipient",
            "device.pub",
            "--sign-key",
            "producer.key",
            "-o",
            "o",
        ],
        cwd=workspace,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 5
    assert "no terminal" in proc.stderr and "Traceback" not in proc.stderr


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("edgepack ")
    for command in (["pack"], ["verify"], ["inspect"], ["keys", "generate"]):
        code, out, _ = run(capsys, *command, "--help")
        assert code == 0 and "Usage" in out


@pytest.mark.parametrize(
    "argv",
    [["pack"], ["nosuch"], ["verify", "--bogus"], ["keys", "generate", "nonsense", "-o", "x"]],
)
def test_usage_errors_exit_2_with_usage_not_a_bug_report(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert "Usage:" in err and "internal error" not in err
