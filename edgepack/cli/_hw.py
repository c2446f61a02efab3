"""``edgepack hw``: list and show the hardware profiles builds target."""

from __future__ import annotations

import typer

from edgepack._cli_output import JSON_OPTION, emit
from edgepack.hw import HardwareProfile, list_profiles, load_profile, profiles_dir

hw_app = typer.Typer(
    name="hw",
    help="Hardware profiles: what each kind of device is and how models are built for it.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def register(app: typer.Typer) -> None:
    """Add the ``hw`` command group to app."""
    app.add_typer(hw_app, name="hw")


@hw_app.command("list")
def list_command(as_json: bool = JSON_OPTION) -> None:
    """List the hardware profiles with their architecture, memory and quantisation recipe."""
    profiles = list_profiles()

    def human() -> None:
        header = ("NAME", "ARCH", "MEMORY", "RECIPE", "DESCRIPTION")
        rows = [
            (
                p.name,
                p.architecture,
                f"{p.memory_mb} MiB",
                p.quantization.recipe,
                p.description,
            )
            for p in profiles
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
        for row in [header, *rows]:
            cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
            typer.echo("  ".join([*cells, row[4]]))
        typer.echo(f"({len(profiles)} profiles in {profiles_dir()})")

    emit({"profiles": [p.to_dict() for p in profiles]}, as_json, human)


@hw_app.command("show")
def show_command(
    name: str = typer.Argument(..., help="Profile name, as `edgepack hw list` prints it."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show everything one hardware profile states."""
    profile = load_profile(name)
    emit(profile.to_dict(), as_json, lambda: _show_human(profile))


def _show_human(profile: HardwareProfile) -> None:
    q = profile.quantization
    rows = [
        ("name", profile.name),
        ("description", profile.description),
        ("architecture", profile.architecture),
        ("cpu features", " ".join(profile.cpu_features) or "-"),
        ("memory", f"{profile.memory_mb} MiB"),
        ("execution providers", ", ".join(profile.execution_providers)),
        ("matches boards", ", ".join(profile.board_models) or "- (fallback for its architecture)"),
        ("requires features", ", ".join(profile.required_features) or "-"),
        ("quantisation", f"{q.recipe}: weights {q.weight_type}, activations {q.activation_type}"),
        ("  per channel", str(q.per_channel).lower()),
        ("  reduce range", str(q.reduce_range).lower()),
        ("  min cosine", f"{q.min_cosine:g}"),
        ("health latency", f"{profile.health.latency_ms:g} ms"),
        ("health memory", f"{profile.health.memory_mb:g} MiB"),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        typer.echo(f"{label:<{width}}  {value}")
