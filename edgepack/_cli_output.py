"""Output helpers shared by both CLIs: one-line errors, JSON or human output.

It sits at the top of the package, outside :mod:`edgepack.cli`, because the device
agent's command line uses it too: importing it must not import the operator CLI,
the repository or the builder (tests/agent/test_footprint.py checks this).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click
import typer

from edgepack.errors import EdgepackError


def run_cli(app: typer.Typer, prog: str, argv: list[str], *, error_prefix: str = "") -> int:
    """Run a typer app, turning our errors into one line and an exit code.

    Typer's own usage errors keep click's exit code 2. Anything else that
    escapes is a bug; it is reported in one line too, never as a traceback.
    ``error_prefix`` starts each of those lines (the agent passes ``<3>``, the
    journal's "error" priority, when its stderr is the journal).
    """
    who = error_prefix + prog
    try:
        # Without standalone mode click returns a ``typer.Exit(code)``'s code, not raise it.
        result = app(args=argv, prog_name=prog, standalone_mode=False)
    except EdgepackError as exc:
        typer.echo(f"{who}: error: {exc.diagnostics()}", err=True)
        return exc.exit_code
    except (typer.Exit, click.exceptions.Exit) as exc:
        return int(getattr(exc, "exit_code", 0) or 0)
    except (typer.Abort, click.exceptions.Abort):
        typer.echo(f"{who}: aborted", err=True)
        return 130
    except (typer.TyperException, click.ClickException) as exc:
        # Usage and parameter errors (typer vendors click; both spellings are caught).
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            typer.echo(f"{who}: error: {exc}", err=True)
        return int(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        typer.echo(f"{who}: interrupted", err=True)
        return 130
    except Exception as exc:  # a bug: still one line, with what to report
        typer.echo(
            f"{who}: internal error: {type(exc).__name__}: {exc} "
            "(this is a bug; set EDGEPACK_DEBUG=1 for a traceback)",
            err=True,
        )
        if _debug():
            raise
        return 1
    return result if isinstance(result, int) else 0


def _debug() -> bool:
    import os

    return os.environ.get("EDGEPACK_DEBUG") == "1"


def emit(data: Any, as_json: bool, human: Callable[[], None]) -> None:
    """Print ``data`` as JSON when asked, else call the human renderer."""
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    else:
        human()


JSON_OPTION = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")


def version_option(prog: str) -> Any:
    """The ``--version`` option of ``prog``'s root callback (both CLIs use it)."""

    def show_version(value: bool) -> None:
        if value:
            from edgepack._version import __version__

            typer.echo(f"{prog} {__version__}")
            raise typer.Exit(0)

    return typer.Option(
        False, "--version", callback=show_version, is_eager=True, help="Print the version and exit."
    )


def new_app(prog: str, summary: str) -> typer.Typer:
    """A command-line app with the settings both CLIs share and a ``--version`` option."""
    app = typer.Typer(
        name=prog,
        help=summary,
        no_args_is_help=True,
        # -h as well as --help; subcommands inherit it from the root context.
        context_settings={"help_option_names": ["-h", "--help"]},
        # typer's --install-completion / --show-completion for bash, zsh, fish, PowerShell.
        add_completion=True,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )

    def root(version: bool = version_option(prog)) -> None:
        pass

    root.__doc__ = summary
    app.callback()(root)
    return app
