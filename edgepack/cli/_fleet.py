"""``edgepack fleet …``: the fleet service, its devices, and the rollouts it watches.

Each command opens the fleet store named by ``--db`` (``sqlite:///PATH``, the
default ``./fleet.db``, or ``postgresql://…``) directly; ``fleet serve`` runs the
HTTP service devices report to. The fleet modules need the ``fleet`` extra.
"""

from __future__ import annotations

import typer

fleet_app = typer.Typer(
    name="fleet",
    help="Serve and query the fleet: device reports, status, self-watching rollouts.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

DB_OPTION = typer.Option(
    "sqlite:///fleet.db",
    "--db",
    metavar="URL",
    envvar="EDGEPACK_FLEET_DB",
    help="The fleet store: sqlite:///PATH (default ./fleet.db) or postgresql://USER@HOST:PORT/DB.",
)


def register(app: typer.Typer) -> None:
    """Add the ``fleet`` command group to ``app``."""
    from edgepack.cli import _fleet_watch

    _fleet_watch.register(fleet_app)
    app.add_typer(fleet_app)
