"""The ``edgepack-agent`` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from device_agent import config as config_mod
from edgepack._cli_output import JSON_OPTION, emit, new_app, run_cli

app = new_app("edgepack-agent", "Install and run edgepack models on this device, safely.")

DATA_DIR_OPTION = typer.Option(
    None,
    "--data-dir",
    envvar="EDGEPACK_DATA_DIR",
    help="The agent's data directory (default /var/lib/edgepack).",
)


def _agent(data_dir: Path | None) -> Any:
    from device_agent.agent import Agent

    data = config_mod.resolve_data_dir(data_dir)
    cfg = config_mod.load(data)
    config_mod.confine_temp(data)
    return Agent(cfg)


@app.command()
def enroll(
    repo_url: str = typer.Option(..., "--repo-url", help="Repository URL, or a directory copy."),
    root: Path = typer.Option(..., "--root", help="The repository's trusted root.json."),
    model: list[str] = typer.Option(
        ..., "--model", help="A model to follow (required; repeat for more)."
    ),
    channel: str = typer.Option("stable", "--channel", help="stable, candidate, beta or edge."),
    cohort: str = typer.Option("", "--cohort", help="Rollout cohort of this device."),
    profile: str = typer.Option("auto", "--profile", help="Hardware profile, or auto."),
    trust: Path | None = typer.Option(None, "--trust", help="Producer trust policy or .pub."),
    recipient_key: Path | None = typer.Option(
        None, "--recipient-key", help="Use this X25519 key instead of generating one."
    ),
    data_dir: Path | None = DATA_DIR_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Pin the trusted root, make the device key, write the configuration."""
    from device_agent.enroll import enroll as do_enroll

    result = do_enroll(
        config_mod.resolve_data_dir(data_dir),
        repo_url=repo_url,
        root=root,
        models=model,
        channel=channel,
        cohort=cohort,
        profile=profile,
        trust=trust,
        recipient_key=recipient_key,
    )
    data = {
        "device_id": result.device_id,
        "public_key": str(result.public_key),
        "config": str(result.config_path),
        "warnings": list(result.warnings),
    }
    for warning in result.warnings:
        typer.echo(f"edgepack-agent: warning: {warning}", err=True)

    def human() -> None:
        typer.echo(f"device id:  {result.device_id}")
        typer.echo(f"public key: {result.public_key}")

    emit(data, as_json, human)


@app.command()
def run(
    once: bool = typer.Option(False, "--once", help="Poll once and exit."),
    data_dir: Path | None = DATA_DIR_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Poll the repository and keep the followed models up to date."""
    from device_agent import loop

    agent = _agent(data_dir)
    if not once:
        import signal
        import threading

        stop = threading.Event()
        # SIGTERM (systemd, snapd) ends the loop between polls; a kill mid-poll is safe too.
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        loop.run(agent, stop=stop)
        return
    outcomes = loop.poll_once(agent)
    data = [vars(o) for o in outcomes]

    def human() -> None:
        for o in outcomes:
            typer.echo(o.describe())

    emit(data, as_json, human)


@app.command()
def status(data_dir: Path | None = DATA_DIR_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Show what each model runs, the last check and the last error."""
    from device_agent import status as status_mod
    from device_agent.state import Journal

    data = config_mod.resolve_data_dir(data_dir)
    cfg = config_mod.load(data)
    # Before the first poll there is no status.json: describe what is installed.
    doc = status_mod.load(data) or status_mod.build(cfg, Journal.load(data), {}, stale=False)

    def human() -> None:
        typer.echo(f"device {doc.get('device_id', '?')}  stale: {doc.get('stale', False)}")
        for name, m in sorted(doc.get("models", {}).items()):
            err = f"  error: {m['last_error']}" if m.get("last_error") else ""
            typer.echo(f"{name}: {m.get('version') or '-'} ({m.get('state')}){err}")

    emit(doc, as_json, human)


@app.command("list")
def list_revisions(
    name: str | None = typer.Argument(None, help="One model (default: all followed)."),
    data_dir: Path | None = DATA_DIR_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """List installed revisions and their states."""
    agent = _agent(data_dir)
    names = [name] if name else agent.config.models
    data = {n: agent.revisions(n) for n in names}

    def human() -> None:
        for n, revs in data.items():
            for r in revs:
                flags = [k for k in ("active", "known_good", "revoked") if r[k]]
                typer.echo(f"{n} {r['revision']}  {' '.join(flags)}")

    emit(data, as_json, human)


def _verdict(name: str, data_dir: Path | None, as_json: bool, action: str) -> None:
    agent = _agent(data_dir)
    with agent.exclusive():
        revision = getattr(agent, action)(name)
    emit(
        {"model": name, "revision": revision, "action": action},
        as_json,
        lambda: typer.echo(f"{name}: {action} -> {revision}"),
    )


@app.command()
def revert(name: str, data_dir: Path | None = DATA_DIR_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Go back to the previous known-good revision (not retried until a newer release)."""
    _verdict(name, data_dir, as_json, "revert")


@app.command()
def confirm(
    name: str, data_dir: Path | None = DATA_DIR_OPTION, as_json: bool = JSON_OPTION
) -> None:
    """The application confirms the new model works (ends the confirmation window)."""
    _verdict(name, data_dir, as_json, "confirm")


@app.command("report-bad")
def report_bad(
    name: str, data_dir: Path | None = DATA_DIR_OPTION, as_json: bool = JSON_OPTION
) -> None:
    """The application reports the new model bad: roll back now."""
    _verdict(name, data_dir, as_json, "report_bad")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``edgepack-agent`` console script."""
    code = run_cli(app, "edgepack-agent", argv if argv is not None else sys.argv[1:])
    if argv is None:
        sys.exit(code)
    return code


from device_agent import cli_detect  # noqa: E402 - hardware detection lives in its own module, registered last

cli_detect.register(app)
