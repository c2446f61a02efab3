"""The ``edgepack`` command line: builder, repository and operator commands.

Each command group lives in its own module with a ``register(app)`` function;
``main()`` is the one place that turns an :class:`~edgepack.errors.EdgepackError`
into one line on stderr and a meaningful exit code.
"""

from __future__ import annotations

import sys

import typer

from edgepack._version import __version__
from edgepack.cli import _build, _bundle, _hw, _keys, _repo
from edgepack.cli._output import run_cli

app = typer.Typer(
    name="edgepack",
    help="Build, sign, encrypt and publish ML models for edge fleets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"edgepack {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_version_callback,
        is_eager=True,
        help="Print the version and exit.",
    ),
) -> None:
    """Build, sign, encrypt and publish ML models for edge fleets."""


for _module in (_keys, _bundle, _build, _hw, _repo):
    _module.register(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``edgepack`` console script."""
    code = run_cli(app, "edgepack", argv if argv is not None else sys.argv[1:])
    if argv is None:
        sys.exit(code)
    return code
