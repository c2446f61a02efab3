"""Small things both command lines owe a person: -h, shell completion, the builder extra
named when it is missing, one key per recipient file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from device_agent.cli import main as agent_main
from edgepack.cli import main
from edgepack.keys import generate_recipient_key, load_recipient_public_key, write_keypair

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env=env,
        timeout=120,
    )


def test_build_on_a_base_install_names_the_builder_extra(tmp_path: Path) -> None:
    # A base install has no onnx: None in sys.modules makes `import onnx` fail as there.
    argv = ["build", str(tmp_path / "m.onnx"), "--name", "digits", "--version", "1.0.0"]
    argv += ["--hw", "generic-x86_64", "--recipient", str(tmp_path / "fleet.pub")]
    argv += ["-o", str(tmp_path / "out")]
    proc = _python(
        "import sys\n"
        "sys.modules['onnx'] = None\n"
        "from edgepack.cli import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.splitlines() == [
        "edgepack: error: edgepack build needs the builder extras: pip install 'edgepack[builder]'"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["-h"], ["repo", "status", "-h"], ["keys", "generate", "-h"]])
def test_dash_h_is_help_for_edgepack(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("Usage: edgepack") and "-h, --help" in out


@pytest.mark.parametrize("argv", [["-h"], ["run", "-h"], ["status", "-h"]])
def test_dash_h_is_help_for_the_agent(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert agent_main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("Usage: edgepack-agent") and "-h, --help" in out


@pytest.mark.parametrize(
    ("module", "prog", "word", "expected"),
    [
        ("edgepack.cli", "edgepack", "re", "repo"),
        ("device_agent", "edgepack-agent", "st", "status"),
    ],
)
def test_shell_completion_is_on(module: str, prog: str, word: str, expected: str) -> None:
    shown = subprocess.run(
        [sys.executable, "-m", module, "--show-completion", "bash"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    variable = "_" + prog.upper().replace("-", "_") + "_COMPLETE"
    assert f"{variable}=complete_bash" in shown.stdout
    # What bash asks when TAB is pressed after `PROG WORD`.
    env = dict(
        os.environ, COMP_WORDS=f"{prog} {word}", COMP_CWORD="1", **{variable: "complete_bash"}
    )
    asked = subprocess.run(
        [sys.executable, "-m", module],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert asked.returncode == 0, asked.stderr
    assert expected in asked.stdout.split()


def _two_keys_in_one_file(tmp_path: Path) -> Path:
    first = write_keypair(tmp_path / "a", generate_recipient_key()).public
    second = write_keypair(tmp_path / "b", generate_recipient_key()).public
    many = tmp_path / "many.pub"
    many.write_bytes(first.read_bytes() + second.read_bytes())
    return many


def test_a_recipient_file_of_two_keys_is_refused(tmp_path: Path) -> None:
    many = _two_keys_in_one_file(tmp_path)
    with pytest.raises(Exception, match="2 PEM blocks") as info:
        load_recipient_public_key(many)
    assert "--recipient once per key" in str(info.value.hint)  # type: ignore[attr-defined]


def test_pack_refuses_a_recipient_file_of_two_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    many = _two_keys_in_one_file(tmp_path)
    (tmp_path / "model").mkdir()
    model, key, out = (str(tmp_path / n) for n in ("model", "producer.key", "out"))
    argv = ["pack", model, "--name", "digits", "--version", "1.0.0", "--recipient", str(many)]
    code = main([*argv, "--sign-key", key, "-o", out])
    err = capsys.readouterr().err
    assert code == 5, err
    assert err.splitlines() == [
        f"edgepack: error: {many} holds 2 PEM blocks, not one key; "
        "put each key in its own file and pass --recipient once per key"
    ]
    assert not (tmp_path / "out").exists()
