"""``edgepack fleet watch``: rollouts that halt, roll back or widen by themselves."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import typer

from edgepack._cli_output import JSON_OPTION, emit
from edgepack.cli._fleet import DB_OPTION
from edgepack.cli._repo import PASSPHRASE_ENV, _passphrases


def _decision_line(d: Any) -> str:
    return f"{d.model}/{d.channel} {d.version}: {d.action} at {d.step:g}%: {d.reason}"


def watch_command(
    db: str = DB_OPTION,
    workdir: Path = typer.Option(
        ..., "--repo", metavar="WORKDIR", help="The repository's directory (its rollouts.json)."
    ),
    key: str | None = typer.Option(
        None,
        "--key",
        metavar="OPERATORS.key",
        help="Operators' key (PEM or signer URI), needed only to publish a rollback or a "
        "widening. Without it the watcher only halts: a rollback is recorded as needing an "
        "operator, a due widening waits.",
    ),
    passphrase_env: str | None = PASSPHRASE_ENV,
    once: bool = typer.Option(False, "--once", help="One pass, then exit (for a systemd timer)."),
    interval: str = typer.Option(
        "60s", "--interval", metavar="DURATION", help="Time between passes (30s, 10m, 1h)."
    ),
    stale_after: str = typer.Option(
        "1h",
        "--stale-after",
        metavar="DURATION",
        help="A device silent this long is stale: counted apart, never in a failure rate.",
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Watch the rollouts promoted with --halt-on-failure: halt, roll back or widen them.

    Reads the release health from the fleet store and the policies from
    WORKDIR/rollouts.json. Every decision is claimed in the store first (two
    watchers make one decision), logged with its reason, and shown by `fleet
    status`. Runs until SIGTERM or SIGINT, or one pass with --once. Giving the
    watcher the operators' key lets it publish channel documents: run it on the
    operators' host, not the fleet service's, or without --key (halt only).
    """
    from edgepack.fleet import watch
    from edgepack.fleet.sql import open_store
    from edgepack.repo import _rollouts
    from edgepack.repo._ops import open_store as open_repo

    interval_s = _rollouts.parse_duration(interval, "--interval")
    stale_s = _rollouts.parse_duration(stale_after, "--stale-after")
    passphrase = _passphrases(passphrase_env)
    # A missing repository, a damaged rollouts.json, a wrong key or passphrase: one
    # line at start, not a loop that fails quietly at its first decision.
    _paths, _settings, repo_store = open_repo(workdir, passphrase, None)
    _rollouts.load(workdir)
    if key is not None:
        from edgepack.repo._settings import OPERATORS

        repo_store.signers(OPERATORS, [key])
    _logging(as_json)
    if once:
        fleet = open_store(db)
        try:
            decisions = watch.watch_once(
                fleet, workdir, key=key, passphrase=passphrase, stale_after_s=stale_s
            )
        finally:
            fleet.close()
        rollouts = [r.to_dict() for r in _rollouts.load(workdir).values()]

        def human() -> None:
            for decision in decisions:
                typer.echo(_decision_line(decision))

        emit({"decisions": [asdict(d) for d in decisions], "rollouts": rollouts}, as_json, human)
        return
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logging.getLogger("edgepack.fleet.watch").info(
            "%s: stopping after this pass", signal.Signals(signum).name
        )
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def show(decision: Any) -> None:
        if as_json:
            sys.stdout.write(json.dumps(asdict(decision), sort_keys=True) + "\n")
        else:
            typer.echo(_decision_line(decision))
        sys.stdout.flush()

    watch.watch_forever(
        lambda: open_store(db),
        workdir,
        interval_s=interval_s,
        stop=stop,
        key=key,
        passphrase=passphrase,
        stale_after_s=stale_s,
        on_decision=show,
    )


def _logging(as_json: bool) -> None:
    """Decisions and their reasons go to stderr (the journal under systemd)."""
    logger = logging.getLogger("edgepack.fleet.watch")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("edgepack fleet watch: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def register(app: typer.Typer) -> None:
    """Add ``watch`` to the fleet command group."""
    app.command("watch")(watch_command)
