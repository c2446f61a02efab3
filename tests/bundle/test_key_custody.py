"""``edgepack keys generate`` writes an unencrypted key only on purpose, and says so; the
passphrase may come from a systemd credential (``LoadCredential=edgepack-passphrase:FILE``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgepack import keys
from edgepack.errors import KeyFileError

REPO = Path(__file__).resolve().parents[2]


def _generate(tmp_path: Path, *extra: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("EDGEPACK_PASSPHRASE", "CREDENTIALS_DIRECTORY")
    }
    return subprocess.run(
        [sys.executable, "-m", "edgepack.cli", "keys", "generate", "recipient", *extra],
        cwd=tmp_path,
        env={**clean, **env, "PYTHONPATH": str(REPO)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_no_passphrase_and_no_terminal_refuses_like_repo_init(tmp_path: Path) -> None:
    out = _generate(tmp_path, "-o", "fleet")
    assert out.returncode == 5, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "EDGEPACK_PASSPHRASE" in lines[0] and "--no-passphrase" in lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_no_passphrase_writes_an_unencrypted_key_and_says_so(tmp_path: Path) -> None:
    out = _generate(tmp_path, "-o", "fleet", "--no-passphrase")
    assert out.returncode == 0, out.stderr
    assert "NOT encrypted" in out.stderr and "fleet.key" in out.stderr
    assert b"ENCRYPTED" not in (tmp_path / "fleet.key").read_bytes()
    keys.load_recipient_private_key(tmp_path / "fleet.key")  # opens with no passphrase


def test_a_passphrase_from_the_environment_encrypts_without_a_warning(tmp_path: Path) -> None:
    out = _generate(tmp_path, "-o", "fleet", EDGEPACK_PASSPHRASE="correct horse")
    assert out.returncode == 0, out.stderr
    assert "NOT encrypted" not in out.stderr
    assert b"ENCRYPTED PRIVATE KEY" in (tmp_path / "fleet.key").read_bytes()


def test_the_systemd_credential_is_a_passphrase_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "edgepack-passphrase").write_text("from systemd\n")  # one newline dropped
    work = tmp_path / "work"
    work.mkdir()
    out = _generate(work, "-o", "fleet", CREDENTIALS_DIRECTORY=str(credentials))
    assert out.returncode == 0, out.stderr
    monkeypatch.delenv("EDGEPACK_PASSPHRASE", raising=False)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    keys.load_recipient_private_key(work / "fleet.key")
    (credentials / "edgepack-passphrase").write_text("something else\n")
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        keys.load_recipient_private_key(work / "fleet.key")
    monkeypatch.setenv("EDGEPACK_PASSPHRASE", "from systemd")  # the environment comes first
    keys.load_recipient_private_key(work / "fleet.key")


def test_repo_init_without_a_passphrase_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgepack.cli import main

    assert main(["repo", "init", str(tmp_path / "repo"), "--no-passphrase"]) == 0
    err = capsys.readouterr().err
    assert "NOT encrypted" in err and str(tmp_path / "repo" / "keys") in err
