"""``edgepack fleet watch``: rollouts that halt, roll back or widen by themselves."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add ``watch`` to the fleet command group."""
