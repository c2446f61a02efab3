"""``edgepack-agent detect``: show what this machine is and which hardware profile it gets."""

from __future__ import annotations

from pathlib import Path

import typer

from device_agent.hwdetect import Detection, choose_profile, read_machine_facts
from edgepack._cli_output import JSON_OPTION, emit

ROOT_OPTION = typer.Option(
    Path("/"),
    "--root",
    help="Read /proc and /sys under this directory instead (a captured machine, for tests).",
    file_okay=False,
    exists=True,
)


def register(app: typer.Typer) -> None:
    """Add the ``detect`` command to the agent's app."""

    @app.command("detect")
    def detect_command(as_json: bool = JSON_OPTION, root: Path = ROOT_OPTION) -> None:
        """Print the machine's architecture, CPU, board and memory, and the profile chosen."""
        detection = choose_profile("auto", facts=read_machine_facts(root))
        emit(detection.to_dict(), as_json, lambda: _print_human(detection))


def _print_human(detection: Detection) -> None:
    data = detection.to_dict()
    cpu = data["cpu"]
    memory = f"{data['memory_mb']} MiB" if data["memory_mb"] is not None else "unknown"
    rows = [
        ("architecture", f"{data['architecture']} (machine {data['machine']})"),
        ("cpu", f"{cpu['processors']} processors, {', '.join(cpu['cores']) or 'unknown cores'}"),
        ("cpu features", " ".join(cpu["features"]) or "none found"),
        ("board (device tree)", data["device_tree_model"] or "-"),
        ("board (DMI product)", data["dmi_product_name"] or "-"),
        ("memory", memory),
        ("profile", f"{data['profile']} ({data['matched_by']})"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        typer.echo(f"{name:<{width}}  {value}")
    typer.echo("why:")
    for reason in data["reasons"]:
        typer.echo(f"  - {reason}")
