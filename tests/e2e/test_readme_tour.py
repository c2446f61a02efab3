"""The README's "A short tour", typed as written, installs the model on the device.

The test reads the ```sh blocks of the tour section of README.md and runs
their commands in order in one bash process (so the tour's ``export`` lines and
its background server carry over), in an empty working directory. It changes
only these, and each must occur in the tour:

* ``/srv/edgepack`` (the repository) and ``/var/lib/edgepack`` (the device's
  data directory) become directories under the test's temporary directory;
* port ``8080`` (``--port 8080`` and ``http://127.0.0.1:8080``) becomes a free
  loopback port;
* a command the tour starts in the background (``… &``) has its output sent to
  a log file, and the test waits for the port before the next command.

Every command must exit 0. A comment that says what a command prints
(``# digits: installed 1.1.0-…``, up to a `` — ``) is checked against its
output, ``…`` standing for the rest of a revision name. At the end the device must run
digits 1.0.0, with 1.1.0 (reverted locally) not retried.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.servers import free_port

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## A short tour"
REPO_DIR = "/srv/edgepack"
DATA_DIR = "/var/lib/edgepack"
TOUR_PORT = "8080"
TOUR_TIMEOUT_S = 240
BEGIN = "@@tour-begin"
END = "@@tour-end"


@dataclass(frozen=True)
class Command:
    """One command of the tour: its text (continuations joined) and what its comment claims."""

    text: str
    claim: str | None  # "digits: installed 1.1.0-…": a comment's words before any " — "

    @property
    def background(self) -> bool:
        return re.search(r"\s&\s*(#.*)?$", self.text) is not None


def tour_section(readme: str) -> str:
    """The README from the tour's heading to the next second-level heading."""
    start = readme.index(SECTION)
    rest = readme[start + len(SECTION) :]
    end = rest.find("\n## ")
    return rest if end < 0 else rest[:end]


def sh_blocks(section: str) -> list[str]:
    """The bodies of the section's ```sh blocks, in order."""
    return re.findall(r"^```sh\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)


def trailing_comment(line: str) -> str | None:
    """The text of a ``  # comment`` ending a shell line outside quotes, if any."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and i > 0 and line[i - 1].isspace():
            return line[i + 1 :].strip()
    return None


def parse_commands(block: str) -> list[Command]:
    """Commands of one block: ``\\`` continuations joined, a here-document kept whole."""
    commands: list[Command] = []
    lines = block.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = [line]
        while parts[-1].endswith("\\") and i < len(lines):
            parts[-1] = parts[-1][:-1].rstrip()
            parts.append(lines[i].strip())
            i += 1
        text = " ".join(parts)
        comment = trailing_comment(text)
        heredoc = re.search(r"<<-?\s*'?(\w+)'?", text)
        if heredoc:
            word = heredoc.group(1)
            body = []
            while i < len(lines) and lines[i].strip() != word:
                body.append(lines[i])
                i += 1
            assert i < len(lines), f"the here-document of {text!r} never ends"
            i += 1
            text = "\n".join([text, *body, word])
        claim = (
            comment.split(" — ")[0].strip() if comment and comment.startswith("digits: ") else None
        )
        commands.append(Command(text, claim))
    return commands


def tour_commands(readme: str) -> list[Command]:
    return [c for block in sh_blocks(tour_section(readme)) for c in parse_commands(block)]


def substitute(text: str, repo: Path, data: Path, port: int) -> str:
    """The test's documented substitutions (module docstring), nothing else."""
    text = text.replace(REPO_DIR, str(repo)).replace(DATA_DIR, str(data))
    text = text.replace(f"--port {TOUR_PORT}", f"--port {port}")
    return text.replace(f"127.0.0.1:{TOUR_PORT}", f"127.0.0.1:{port}")


def tour_script(commands: list[Command], repo: Path, data: Path, port: int, log: Path) -> str:
    """One bash script: every command between markers carrying its index and exit code.

    It stops at the first command that fails, and stops its background jobs at the end.
    """
    out = ["trap 'kill $(jobs -p) 2>/dev/null' EXIT"]
    for n, command in enumerate(commands):
        text = substitute(command.text, repo, data, port)
        if command.background:
            text = re.sub(r"\s&\s*(#.*)?$", f' >"{log}" 2>&1 &', text)
        out += [
            f"printf '\\n{BEGIN} {n}\\n'",
            text,
            "rc=$?",
            f"printf '\\n{END} {n} %d\\n' \"$rc\"",
            '[ "$rc" = 0 ] || exit 0',
        ]
        if command.background:
            out.append(
                f"for _ in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null && break;"
                " sleep 0.1; done"
            )
    return "\n".join(out) + "\n"


def split_output(output: str) -> dict[int, tuple[int, str]]:
    """Exit code and output (stdout and stderr) of every command that ran, by index."""
    results: dict[int, tuple[int, str]] = {}
    pattern = rf"^{BEGIN} (\d+)\n(.*?)^{END} (\d+) (\d+)$"
    for m in re.finditer(pattern, output, flags=re.MULTILINE | re.DOTALL):
        assert m.group(1) == m.group(3), m.group(0)
        results[int(m.group(1))] = (int(m.group(4)), m.group(2))
    return results


def claim_pattern(claim: str) -> str:
    """A comment's claim as a regular expression: ``…`` is the rest of a revision name."""
    return r"\S*".join(re.escape(part) for part in claim.split("…"))


# ---------------------------------------------------------------------- the parser
def test_the_parser_joins_continuations_and_keeps_here_documents() -> None:
    block = (
        "# a comment line\n"
        "edgepack a \\\n    --b c   # digits: installed 1.0.0-… — and more\n"
        "python - <<'EOF'   # a here-document\nprint('#')\nEOF\n"
        "edgepack repo serve /srv/edgepack --port 8080 &   # background\n"
        "echo '# not a comment'\n"
    )
    commands = parse_commands(block)
    assert [c.text.split("\n")[0] for c in commands] == [
        "edgepack a --b c   # digits: installed 1.0.0-… — and more",
        "python - <<'EOF'   # a here-document",
        "edgepack repo serve /srv/edgepack --port 8080 &   # background",
        "echo '# not a comment'",
    ]
    assert commands[1].text.endswith("\nprint('#')\nEOF")
    assert commands[0].claim == "digits: installed 1.0.0-…"
    assert [c.background for c in commands] == [False, False, True, False]
    assert commands[3].claim is None
    assert re.fullmatch(claim_pattern("digits: kept 1.0.0-…"), "digits: kept 1.0.0-ab12cd")


# ------------------------------------------------------------------------ the tour
def tour_env(tmp_path: Path) -> dict[str, str]:
    """This interpreter's scripts first on PATH; nothing of the caller's edgepack settings."""
    scripts = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}")
    for var in ("EDGEPACK_PASSPHRASE", "EDGEPACK_DATA_DIR", "EDGEPACK_DEBUG"):
        env.pop(var, None)  # the tour sets what it needs
    env["HOME"] = str(tmp_path / "home")
    (tmp_path / "home").mkdir()
    return env


@pytest.mark.slow
@pytest.mark.timeout(TOUR_TIMEOUT_S + 30)
def test_the_readme_tour_installs_the_model_as_written(tmp_path: Path) -> None:
    readme = README.read_text(encoding="utf-8")
    commands = tour_commands(readme)
    joined = "\n".join(c.text for c in commands)
    for placeholder in (REPO_DIR, DATA_DIR, f"--port {TOUR_PORT}", f"127.0.0.1:{TOUR_PORT}"):
        assert placeholder in joined, f"the tour no longer uses {placeholder!r}"
    env = tour_env(tmp_path)
    for program in ("edgepack", "edgepack-agent", "python"):
        assert shutil.which(program, path=env["PATH"]), f"{program} is not installed"

    work, repo, data = tmp_path / "work", tmp_path / "srv", tmp_path / "data"
    work.mkdir()
    port = free_port()
    script = tour_script(commands, repo, data, port, tmp_path / "serve.log")
    proc = subprocess.Popen(
        ["bash", "-c", script],
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the background server is in its process group
    )
    try:
        output, _ = proc.communicate(timeout=TOUR_TIMEOUT_S)
    finally:  # whatever the tour left running in its session (its server) stops here
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    results = split_output(output)

    for n, command in enumerate(commands):
        shown = substitute(command.text, repo, data, port)
        assert n in results, f"the tour never reached {shown!r}:\n{output[-4000:]}"
        rc, out = results[n]
        assert rc == 0, f"{shown!r} exited {rc}:\n{out[-4000:]}"
        if command.claim:
            assert re.search(claim_pattern(command.claim), out), (
                f"{shown!r} was to print {command.claim!r}; it printed:\n{out[-2000:]}"
            )

    status = json.loads(
        subprocess.run(
            ["edgepack-agent", "status", "--json", "--data-dir", str(data)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    )
    digits = status["models"]["digits"]
    assert digits["version"] == "1.0.0", digits
    assert digits["state"] in ("committed", "idle"), digits  # nothing in progress, nothing failed
    assert digits["revision"].startswith("1.0.0-"), digits
    assert not digits["awaiting_confirmation"], digits
    assert any(r.startswith("1.1.0") for r in digits["failed_releases"]), digits
    current = data / "models" / "digits" / "current"
    assert os.readlink(current) == digits["revision"], digits
    assert sorted(p.name for p in current.iterdir()) == ["bundle.epk", "key.sealed"]
