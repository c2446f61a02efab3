"""The ``edgepack-agent`` command line."""

from __future__ import annotations

import sys

import typer

from edgepack._version import __version__
from edgepack.cli._output import run_cli

app = typer.Typer(
    name="edgepack-agent",
    help="Install and run edgepack models on this device, safely.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"edgepack-agent {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Install and run edgepack models on this device, safely."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``edgepack-agent`` console script."""
    code = run_cli(app, "edgepack-agent", argv if argv is not None else sys.argv[1:])
    if argv is None:
        sys.exit(code)
    return code
