"""Placeholder registration; filled in by the issue that builds these commands."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to app."""
