"""The ``edgepack-agent`` command line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from device_agent import cli_enroll
from device_agent import config as config_mod
from edgepack._cli_output import JSON_OPTION, emit, new_app, run_cli, version_option
from edgepack.errors import InvalidInputError

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable

    from device_agent.agent import Agent

app = new_app("edgepack-agent", "Install and run edgepack models on this device, safely.")

DATA_DIR_OPTION = typer.Option(
    None,
    "--data-dir",
    envvar="EDGEPACK_DATA_DIR",
    help="The agent's data directory (default /var/lib/edgepack).",
)


def _root(
    version: bool = version_option("edgepack-agent"),
    verbose: int = typer.Option(
        0, "-v", "--verbose", count=True, show_default=False, help="Log more on stderr (-v: debug)."
    ),
    quiet: int = typer.Option(
        0,
        "-q",
        "--quiet",
        count=True,
        show_default=False,
        help="Log less on stderr (-q: no info, -qq: errors only).",
    ),
    log_level: str | None = typer.Option(
        None,
        "--log-level",
        envvar="EDGEPACK_LOG_LEVEL",
        metavar="LEVEL",
        help="debug, info, warning or error (overrides -v and -q).",
    ),
) -> None:
    """Install and run edgepack models on this device, safely."""
    from device_agent import logs

    if log_level is not None and log_level.lower() not in logs.LEVELS:
        raise InvalidInputError(
            f"unknown log level {log_level!r}", hint=f"use one of {', '.join(logs.LEVELS)}"
        )
    logs.configure(logs.level_for(verbose, quiet, log_level))


# Replaces new_app's callback (same --version) to add the logging options of every command.
app.callback()(_root)
cli_enroll.register(app)  # enroll first in the help, then run, status, …; and retry


def _agent(data_dir: Path | None) -> Any:
    from device_agent.agent import Agent

    data = config_mod.resolve_data_dir(data_dir)
    cfg = config_mod.load(data)
    config_mod.confine_temp(data)
    return Agent(cfg)


def _start_reporter(agent: Agent, stop: threading.Event) -> Callable[[], None] | None:
    """Start the report sender when the device has a fleet; its hook for the poll loop.

    The report code and urllib3 load only here. A reporter that cannot start (a bad
    ``fleet_url``, no identity key) is logged and the daemon updates without it.
    """
    if not agent.config.fleet_url:
        return None
    from device_agent.reporter import Reporter
    from edgepack.errors import EdgepackError

    try:
        reporter = Reporter(
            agent.config, profile=agent.device.profile or "", architecture=agent.device.architecture
        )
    except EdgepackError as exc:
        logging.getLogger("device_agent.reporter").error(
            "not reporting to the fleet: %s", exc.diagnostics()
        )
        return None
    reporter.start(stop)
    return reporter.after_poll


@app.command()
def run(
    once: bool = typer.Option(False, "--once", help="Poll once and exit."),
    passphrase_env: str | None = cli_enroll.PASSPHRASE_ENV_OPTION,
    data_dir: Path | None = DATA_DIR_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Poll the repository and keep the followed models up to date."""
    from device_agent import loop
    from device_agent import outcome as outcome_mod

    agent = _agent(data_dir)
    agent.unlock(passphrase_env)  # a key it cannot open stops it here, exit 5
    if not once:
        import signal
        import threading

        stop = threading.Event()
        # SIGTERM (systemd, snapd) ends the loop between polls; a kill mid-poll is safe too.
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        loop.run(agent, stop=stop, after_poll=_start_reporter(agent, stop))
        return
    outcomes = loop.poll_once(agent)
    data = [vars(o) for o in outcomes]

    def human() -> None:
        for o in outcomes:
            typer.echo(o.describe())

    emit(data, as_json, human)
    code = outcome_mod.exit_code(outcomes)
    if code:  # the reasons are on stderr already, logged by the poll
        raise typer.Exit(code)


@app.command()
def status(data_dir: Path | None = DATA_DIR_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Show what each model runs, the last check and the last error."""
    from device_agent import status as status_mod
    from device_agent.state import Journal

    data = config_mod.resolve_data_dir(data_dir)
    cfg = config_mod.load(data)
    # Before the first poll there is no status.json: describe what is installed.
    doc = status_mod.load(data) or status_mod.build(cfg, Journal.load(data), {}, stale=False)
    doc = status_mod.refresh_monitoring(cfg, doc)

    def human() -> None:
        fresh = "stale (the repository could not be refreshed)" if doc.get("stale") else "fresh"
        typer.echo(f"device {doc.get('device_id', '?')}  {fresh}")
        for name, m in sorted(doc.get("models", {}).items()):
            notes = [str(m.get("state"))]
            if m.get("awaiting_confirmation"):
                notes.append("awaiting confirmation")
            err = f"  error: {m['last_error']}" if m.get("last_error") else ""
            typer.echo(
                f"{name}: {m.get('revision') or 'nothing running'} ({', '.join(notes)}){err}"
            )
            watch = m.get("monitoring")
            if isinstance(watch, dict):
                typer.echo(f"  monitoring: {_figures(watch)}")
                if isinstance(watch.get("previous"), dict):
                    typer.echo(
                        f"  previous {watch['previous']['revision']}: {_figures(watch['previous'])}"
                    )
                for alert in watch.get("alerts") or []:
                    typer.echo(
                        f"  ALERT {alert.get('kind')}: {alert.get('value')} "
                        f"(threshold {alert.get('threshold')})"
                    )

    emit(doc, as_json, human)


def _figures(watch: dict[str, Any]) -> str:
    """One line of a revision's monitoring figures for ``status``."""
    if watch.get("rows") is None:
        return f"{watch.get('total_rows', 0)} rows monitored, no window scored yet"
    confidence = watch.get("mean_confidence")
    return (
        f"{watch.get('total_rows', 0)} rows monitored; last window of {watch['rows']}: "
        f"drift PSI {watch.get('drift_psi')}, worst feature PSI {watch.get('max_feature_psi')}, "
        f"anomalies {watch.get('anomaly_rate')}"
        + (f", mean confidence {confidence}" if confidence is not None else "")
        + f", {len(watch.get('alerts') or [])} alerts"
    )


@app.command()
def check(
    max_stale: float | None = typer.Option(
        None,
        "--max-stale",
        metavar="SECONDS",
        help="Oldest acceptable last successful check (default: 3 poll intervals).",
    ),
    data_dir: Path | None = DATA_DIR_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """For a monitoring timer: exit 0 when every model is healthy, else a documented code.

    Reads DATA/status.json only (no network, no lock).
    """
    import time

    from device_agent import status as status_mod
    from device_agent.state import Journal

    data = config_mod.resolve_data_dir(data_dir)
    cfg = config_mod.load(data)
    doc = status_mod.load(data) or status_mod.build(cfg, Journal.load(data), {}, stale=False)
    doc = status_mod.refresh_monitoring(cfg, doc)
    bound = max_stale if max_stale is not None else 3 * cfg.limits.poll_interval_s
    if bound < 0:
        raise InvalidInputError(f"--max-stale {bound:g} is negative")
    now = time.time()
    problems = status_mod.check(cfg, doc, max_stale_s=bound, now=now)
    code = problems[0].code if problems else 0
    models = doc.get("models", {})
    report = {
        "healthy": not problems,
        "exit_code": code,
        "max_stale_s": bound,
        "problems": [{"model": p.model, "code": p.code, "problem": p.what} for p in problems],
        "models": {n: models.get(n, {}).get("revision") for n in cfg.models},
    }

    def human() -> None:
        for p in problems:
            typer.echo(f"{p.model}: {p.what}")
        if not problems:
            for n in cfg.models:
                last = models.get(n, {}).get("last_check")
                typer.echo(f"ok: {n} runs {models[n]['revision']}, checked {now - last:.0f} s ago")

    emit(report, as_json, human)
    if code:
        raise typer.Exit(code)


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
                flags = [k.replace("_", "-") for k in ("active", "known_good", "revoked") if r[k]]
                if r["failed"]:
                    flags.append(f"failed here: {r['failed']}")
                typer.echo(f"{n} {r['revision']}  {', '.join(flags) or '-'}")

    emit(data, as_json, human)


@app.command("report")
def report_command(
    send: bool = typer.Option(
        True, "--send/--no-send", help="Try to send the queue once now (default), or only queue."
    ),
    data_dir: Path | None = DATA_DIR_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Queue a signed report of this device for its fleet service and send the queue once.

    Exits 0 when every queued report was taken, 7 when some are kept for later (the
    service unreachable, slow, failing, or this device not registered yet), 1 when
    the service refused some for good (dropped), 2 when no fleet_url is configured.
    """
    from device_agent import report as report_mod
    from device_agent import selection
    from device_agent import status as status_mod

    data = config_mod.resolve_data_dir(data_dir)
    cfg = config_mod.load(data)
    if not cfg.fleet_url:
        raise report_mod.NoFleetError(
            f"{data} reports to no fleet service (no fleet_url in config.toml)",
            hint="enrol again with --fleet-url URL (re-enrolling keeps everything else)",
        )
    from device_agent.reporter import Reporter, Result

    device = selection.Device.from_config(cfg)
    reporter = Reporter(cfg, profile=device.profile or "", architecture=device.architecture)
    content = report_mod.content(
        cfg, status_mod.load(data), profile=device.profile or "", architecture=device.architecture
    )
    queued = reporter.queue.put(content)
    result = reporter.send_once() if send else Result(kept=len(reporter.queue.pending()))
    doc = {
        "queued": queued.counter,
        "bytes": len(queued.body),
        "sent": result.sent,
        "dropped": result.dropped,
        "kept": result.kept,
        "errors": result.errors,
        "fleet_url": cfg.fleet_url,
    }

    def human() -> None:
        typer.echo(
            f"report {queued.counter} queued ({len(queued.body)} bytes); sent {result.sent}, "
            f"dropped {result.dropped}, kept {result.kept}"
        )
        for error in result.errors:
            typer.echo(f"  {error}")

    emit(doc, as_json, human)
    if result.dropped:
        raise typer.Exit(1)
    if send and result.kept:
        raise typer.Exit(7)


def _verdict(name: str, data_dir: Path | None, as_json: bool, action: str) -> None:
    agent = _agent(data_dir)
    with agent.exclusive():
        revision = getattr(agent, action)(name)
    said = {"revert": "reverted", "report_bad": "reported bad", "confirm": "confirmed"}[action]
    emit(
        {"model": name, "revision": revision, "action": action},
        as_json,
        lambda: typer.echo(f"{name}: {said}; running {revision}"),
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
    from device_agent import logs

    code = run_cli(
        app,
        "edgepack-agent",
        argv if argv is not None else sys.argv[1:],
        error_prefix=f"<{logs.priority(logging.ERROR)}>" if logs.stderr_is_journal() else "",
    )
    if argv is None:
        sys.exit(code)
    return code


from device_agent import cli_detect  # noqa: E402 - hardware detection lives in its own module, registered last

cli_detect.register(app)
