"""Write docs/cli.md from the commands' own help, so the reference never drifts.

    .venv/bin/python -m edgepack.cli._docs > docs/cli.md

tests/test_docs.py checks that the committed file matches.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import typer
from typer.testing import CliRunner


def _paths(command: Any, path: list[str]) -> list[list[str]]:
    """Every leaf command under ``command``, as argument paths."""
    children = getattr(command, "commands", None)
    if not children:
        return [path]
    found: list[list[str]] = []
    for name in sorted(children):
        found.extend(_paths(children[name], [*path, name]))
    return found


def render() -> str:
    """The whole reference as Markdown."""
    from device_agent.cli import app as agent_app
    from edgepack.cli import app as builder_app

    os.environ["COLUMNS"] = "88"
    os.environ["TERMINAL_WIDTH"] = "88"
    runner = CliRunner()
    out = [
        "# Command reference",
        "",
        "Generated from the commands' own `--help` by `python -m edgepack.cli._docs`;",
        "do not edit by hand. Exit codes: 0 success, 1 other failure, 2 usage,",
        "3 bad input, 4 verification failed, 5 key problem, 6 conflict (retry),",
        "7 network. Every command that reports something takes `--json`.",
        "",
    ]
    for prog, app in (("edgepack", builder_app), ("edgepack-agent", agent_app)):
        for path in _paths(typer.main.get_command(app), []):
            result = runner.invoke(app, [*path, "--help"], prog_name=prog)
            text = result.output.rstrip()
            out += [f"## `{' '.join([prog, *path])}`", "", "```text", text, "```", ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(render())
