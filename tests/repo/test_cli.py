"""The command line: every repository and operator command, end to end, in-process."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from edgepack.cli import main
from tests.repo.conftest import Producer, make_bundle, team_key


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    code, out, err = run(capsys, *args, "--json")
    assert code == 0, err
    data: dict[str, object] = json.loads(out)
    return data


def test_operator_workflow(
    tmp_path: Path,
    producer: Producer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REPO_PASS", "s3cret")
    monkeypatch.delenv("EDGEPACK_PASSPHRASE", raising=False)
    work = tmp_path / "repo"
    pw = ("--passphrase-env", "REPO_PASS")
    init = run_json(
        capsys,
        "repo",
        "init",
        str(work),
        "--root-keys",
        "3",
        "--root-threshold",
        "2",
        "--expiry",
        "timestamp=2",
        *pw,
    )
    assert init["encrypted"] is True and len(init["keys"]["root"]) == 3  # type: ignore[index]
    private, public = team_key(tmp_path, "digits")
    run_json(capsys, "repo", "add-model", str(work), "digits", "--key", str(public), *pw)
    bundles = [make_bundle(tmp_path / "b", producer, "digits", v) for v in ("1.0.0", "2.0.0")]
    published = run_json(
        capsys,
        "publish",
        *map(str, bundles),
        "--repo",
        str(work),
        "--key",
        str(private),
        "--channel",
        "edge",
        *pw,
    )
    assert len(published["targets"]) == 2  # type: ignore[arg-type]
    run_json(capsys, "promote", "digits", "1.0.0", "--repo", str(work), "--channel", "stable", *pw)
    staged = run_json(
        capsys,
        "promote",
        "digits",
        "2.0.0",
        "--repo",
        str(work),
        "--channel",
        "stable",
        "--rollout",
        "25",
        "--cohort",
        "lab",
        *pw,
    )
    doc = staged["documents"][0]  # type: ignore[index]
    assert doc["current"] == {
        "version": "2.0.0",
        "rollout": 25,
        "cohorts": ["lab"],
        "variants": {
            "any": {"target": "models/digits/digits-2.0.0-any.epk", "architecture": "aarch64"}
        },
    }
    back = run_json(capsys, "rollback", "digits", "--repo", str(work), "--channel", "stable", *pw)
    assert back["documents"][0]["current"]["version"] == "1.0.0"  # type: ignore[index]
    revoked = run_json(capsys, "revoke", "digits", "2.0.0", "--repo", str(work), *pw)
    assert len(revoked["documents"]) == 4  # type: ignore[arg-type]
    quiet = run(capsys, "repo", "refresh", str(work))  # nothing due: no key, no output
    assert quiet == (0, "", "")
    assert run_json(capsys, "repo", "refresh", str(work), "--force", *pw)["versions"]
    rotated = run_json(capsys, "keys", "rotate", "snapshot", "--repo", str(work), *pw)
    assert rotated["versions"]["root"] == 2  # type: ignore[index]
    status = run_json(capsys, "repo", "status", str(work))
    stable = next(c for c in status["channels"] if c["channel"] == "stable")  # type: ignore[attr-defined]
    assert stable["current"]["version"] == "1.0.0" and stable["revoked"] == ["2.0.0"]
    code, out, _ = run(capsys, "repo", "status", str(work))
    assert code == 0 and "digits/stable #4: 1.0.0 at 100%; revoked 2.0.0" in out


def test_clear_errors_and_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EDGEPACK_PASSPHRASE", raising=False)
    work = tmp_path / "repo"
    code, _, err = run(capsys, "repo", "init", str(work))  # no terminal, no variable
    assert code == 5 and "no terminal" in err and err.count("\n") == 1
    monkeypatch.setenv("EDGEPACK_PASSPHRASE", "right")
    assert run(capsys, "repo", "init", str(work))[0] == 0
    _private, public = team_key(tmp_path, "digits")
    monkeypatch.setenv("EDGEPACK_PASSPHRASE", "wrong")
    code, _, err = run(capsys, "repo", "add-model", str(work), "digits", "--key", str(public))
    assert code == 5 and "wrong passphrase" in err
    code, _, err = run(
        capsys, "promote", "digits", "1.0.0", "--repo", str(work), "--channel", "nightly"
    )
    assert code == 3 and "unknown channel 'nightly'" in err
    code, _, err = run(capsys, "repo", "status", str(tmp_path / "nothing"))
    assert code == 3 and "not an edgepack repository" in err
    code, _, err = run(capsys, "repo", "serve", str(work), "--host", "0.0.0.0")  # noqa: S104 - the refusal is the point
    assert code == 3 and "only binds loopback" in err


def test_serve_answers_on_loopback(tmp_path: Path) -> None:
    work = tmp_path / "repo"
    assert main(["repo", "init", str(work), "--no-passphrase"]) == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgepack.cli", "repo", "serve", str(work), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = line.split(" on ", 1)[1].split(" ", 1)[0]
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{url}metadata/timestamp.json", timeout=10) as reply:  # noqa: S310
            assert json.loads(reply.read())["signed"]["_type"] == "timestamp"
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{url}metadata/", timeout=10)  # noqa: S310 - no listings
        assert not (work / "public" / "keys").exists()
    finally:
        proc.terminate()
        proc.wait(10)
