"""``edgepack fleet …``: the fleet service, its devices, and the rollouts it watches.

Each command opens the fleet store named by ``--db`` (``sqlite:///PATH``, the
default ``./fleet.db``, or ``postgresql://…``) directly; ``fleet serve`` runs the
HTTP service devices report to. The fleet modules need the ``fleet`` extra.
"""

from __future__ import annotations

import enum
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import typer

from edgepack._cli_output import JSON_OPTION, emit
from edgepack.errors import InvalidInputError
from edgepack.repo._rollouts import parse_duration

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


class LogLevel(str, enum.Enum):
    """``fleet serve --log-level``."""

    critical = "critical"
    error = "error"
    warning = "warning"
    info = "info"
    debug = "debug"


def _open(db: str) -> Any:
    """The store of ``--db``, migrated (a bad URL or a dead database is one line)."""
    from edgepack.fleet.sql import open_store

    return open_store(db)


def _read_record(path: str) -> bytes:
    """An enrolment record's bytes from a file or ``-`` (stdin), at most the record limit."""
    from edgepack import fleetreport

    limit = fleetreport.MAX_RECORD_BYTES
    try:
        if path == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with open(path, "rb") as handle:
                data = handle.read(limit + 1)
    except OSError as exc:
        raise InvalidInputError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise InvalidInputError(f"{path} is larger than an enrolment record ({limit} bytes)")
    return data


def _when(at: float | None) -> str:
    from edgepack.fleet.dashboard import age

    if at is None:
        return "never"
    return f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(at))}Z ({age(time.time() - at)} ago)"


def _console() -> Any:
    from rich.console import Console

    # A pipe or a file gets 100 columns rather than rich's 80-column default.
    return Console(width=None if sys.stdout.isatty() else 100, highlight=False)


@fleet_app.command("serve")
def serve_command(
    db: str = DB_OPTION,
    host: str = typer.Option(
        "127.0.0.1", "--host", metavar="ADDRESS", help="Address to listen on."
    ),
    port: int = typer.Option(
        8470, "--port", metavar="PORT", min=0, max=65535, help="Port (0: any free one)."
    ),
    token_file: Path = typer.Option(
        ...,
        "--token-file",
        metavar="FILE",
        help="Operator tokens, one a line, mode 0600 (make one with `edgepack fleet token`).",
    ),
    stale_after: str = typer.Option(
        "1h", "--stale-after", metavar="DURATION", help="A device is stale after this long silent."
    ),
    log_level: LogLevel = typer.Option(
        LogLevel.info,
        "--log-level",
        help="Logging on stderr (info: one access line per request).",
    ),
    tls_cert: Path | None = typer.Option(
        None, "--tls-cert", metavar="PEM", help="Serve HTTPS with this certificate (and --tls-key)."
    ),
    tls_key: Path | None = typer.Option(None, "--tls-key", metavar="PEM", help="Its private key."),
) -> None:
    """Run the fleet service: devices' signed reports in, the operator API and dashboard out.

    Listens on loopback by default; on another address put a TLS reverse proxy in
    front or give --tls-cert/--tls-key. Stops cleanly on SIGTERM or Ctrl-C.
    """
    from edgepack.fleet.serve import serve

    serve(
        db,
        host,
        port,
        token_file,
        log_level=log_level.value,
        stale_after_s=parse_duration(stale_after, "--stale-after"),
        tls_cert=tls_cert,
        tls_key=tls_key,
    )


@fleet_app.command("token")
def token_command(
    out: Path = typer.Option(..., "--out", metavar="FILE", help="The new token file (0600)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Write a new random operator token to FILE (mode 0600; never overwrites a file).

    Give it to `fleet serve --token-file`; operators send it as
    `Authorization: Bearer TOKEN`. To rotate, add a second line, restart, retire the old.
    """
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise InvalidInputError(
            f"{out} exists; refusing to overwrite a token file", hint="choose another --out"
        ) from None
    except OSError as exc:
        raise InvalidInputError(f"cannot create {out}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    emit(
        {"token_file": str(out)},
        as_json,
        lambda: typer.echo(f"wrote a new operator token to {out} (mode 0600)"),
    )


@fleet_app.command("register")
def register_command(
    record: str = typer.Argument(
        ..., metavar="RECORD", help="The device's DATA/keys/enrolment.json (or - for stdin)."
    ),
    db: str = DB_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Register a device from its signed enrolment record (the operator's consent).

    The record's signature and its device id are checked; a revoked device stays revoked.
    """
    from edgepack import fleetreport
    from edgepack.fleet.ingest import device_from_record

    checked = fleetreport.parse_record(_read_record(record))
    device = device_from_record(checked, now=time.time())
    store = _open(db)
    try:
        created = store.register(device)
    finally:
        store.close()
    data = {"device_id": device.device_id, "created": created, "models": list(device.models)}
    emit(
        data,
        as_json,
        lambda: typer.echo(
            f"{'registered' if created else 'updated'} {device.device_id} "
            f"({', '.join(device.models)} on {device.channel})"
        ),
    )


@fleet_app.command("revoke-device")
def revoke_device_command(
    device_id: str = typer.Argument(..., metavar="DEVICE", help="The device id (dev-…)."),
    reason: str = typer.Option("", "--reason", help="Why (kept with the device)."),
    db: str | None = typer.Option(
        None,
        "--db",
        metavar="URL",
        envvar="EDGEPACK_FLEET_DB",
        help="The fleet store: sqlite:///PATH (default ./fleet.db, unless only --repo is "
        "given) or postgresql://USER@HOST:PORT/DB.",
    ),
    workdir: Path | None = typer.Option(
        None,
        "--repo",
        metavar="WORKDIR",
        help="Also record the revocation in this repository (keys/revoked.json): "
        "`keys wrap` never wraps for the device again.",
    ),
    key: str | None = typer.Option(
        None,
        "--key",
        metavar="KEY",
        help="With --repo: the operators' key (default: WORKDIR/keys/operators.key).",
    ),
    passphrase_env: str | None = typer.Option(
        None,
        "--passphrase-env",
        metavar="VAR",
        help="With --repo: read key passphrases from this variable "
        "(default EDGEPACK_PASSPHRASE, else a prompt).",
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Revoke a device: the service refuses its reports from now on (403).

    With --repo the repository lists it as revoked too and withdraws its key envelopes,
    so it cannot open releases wrapped from now on (it keeps running what it has). With
    --repo and no --db, only the repository is changed.
    """
    from edgepack.envelope import check_device_id

    if key is not None and workdir is None:
        raise InvalidInputError("--key is the repository's operators' key", hint="add --repo")
    if workdir is not None:
        check_device_id(device_id)
    data: dict[str, Any] = {"device_id": device_id, "revoked": True, "reason": reason}
    lines: list[str] = []
    if db is not None or workdir is None:
        store = _open(db or "sqlite:///fleet.db")
        try:
            done = store.revoke(device_id, reason, time.time())
        finally:
            store.close()
        if not done:
            raise InvalidInputError(
                f"{device_id} is not registered", hint="see `edgepack fleet devices`"
            )
        lines.append(f"revoked {device_id}")
    if workdir is not None:
        from edgepack.cli._repo import _passphrases
        from edgepack.repo._envelopes import revoke_device

        result = revoke_device(
            workdir, device_id, reason=reason, passphrase=_passphrases(passphrase_env), key=key
        )
        data["repository"] = {"versions": result.versions, **result.summary}
        withdrawn = len(result.summary["withdrawn"])
        lines.append(
            f"{device_id} was already listed as revoked in {workdir}"
            if result.summary["already"]
            else f"listed {device_id} as revoked in {workdir} (keys/revoked.json); "
            f"withdrew {withdrawn} key envelope(s)"
        )
    emit(data, as_json, lambda: typer.echo("\n".join(lines)))


@fleet_app.command("devices")
def devices_command(db: str = DB_OPTION, as_json: bool = JSON_OPTION) -> None:
    """The registered devices: what they follow, when each last reported."""
    from edgepack.fleet.ingest import device_view

    store = _open(db)
    try:
        found = [device_view(d) for d in store.devices()]
    finally:
        store.close()

    def human() -> None:
        from rich.table import Table

        table = Table(title=f"{len(found)} registered devices", title_justify="left")
        table.add_column("device", no_wrap=True)
        table.add_column("models")
        table.add_column("channel")
        table.add_column("last seen", no_wrap=True)
        table.add_column("state")
        for d in found:
            state = f"revoked: {d['revoked_reason']}" if d["revoked_at"] else "registered"
            table.add_row(
                d["device_id"], ", ".join(d["models"]), d["channel"], _when(d["last_seen"]), state
            )
        _console().print(table)

    emit({"devices": found}, as_json, human)


@fleet_app.command("show")
def show_command(
    device_id: str = typer.Argument(..., metavar="DEVICE", help="The device id (dev-…)."),
    db: str = DB_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """One device: its registration and its last report."""
    from edgepack.fleet.ingest import device_detail

    store = _open(db)
    try:
        detail = device_detail(store, device_id)
    finally:
        store.close()
    if detail is None:
        raise InvalidInputError(
            f"{device_id} is not registered", hint="see `edgepack fleet devices`"
        )

    def human() -> None:
        from rich.table import Table

        d = detail["device"]
        console = _console()
        for label, value in (
            ("device", d["device_id"]),
            ("identity", d["identity"]),
            ("models", ", ".join(d["models"])),
            ("channel", f"{d['channel']} (cohort {d['cohort']})"),
            ("profile", f"{d['profile']} ({d['architecture']})"),
            ("registered", _when(d["registered_at"])),
            (
                "revoked",
                f"{_when(d['revoked_at'])}: {d['revoked_reason']}" if d["revoked_at"] else "no",
            ),
            ("last report", f"#{d['last_counter']}, {_when(d['last_seen'])}"),
        ):
            console.print(f"{label:>12}  {value}", markup=False)
        report = detail["last_report"]
        if not report:
            return
        console.print(
            f"{'agent':>12}  {report['agent_version']} ({report['profile']})", markup=False
        )
        table = Table(title_justify="left")
        for column in ("model", "channel", "version", "pending", "last action", "error", "stale"):
            table.add_column(column)
        for name, m in sorted(report["models"].items()):
            refused = "; ".join(f"refused {v}: {why}" for v, why in m["refused"].items())
            table.add_row(
                name,
                m["channel"],
                m["version"] or "—",
                m["pending"] or "",
                m["last_action"] or "",
                "; ".join(x for x in (m["last_error"], refused) if x),
                "stale" if m["stale"] else "",
            )
        console.print(table)

    emit(detail, as_json, human)


@fleet_app.command("status")
def status_command(
    model: str | None = typer.Option(None, "--model", metavar="MODEL", help="Only this model."),
    channel: str | None = typer.Option(
        None, "--channel", metavar="CHANNEL", help="Only this channel."
    ),
    stale_after: str = typer.Option(
        "1h",
        "--stale-after",
        metavar="DURATION",
        help="A report older than this is stale: counted, never in a failure rate.",
    ),
    unseen_since: str | None = typer.Option(
        None,
        "--unseen-since",
        metavar="DURATION",
        help="Also list devices silent for this long (default: only those never seen).",
    ),
    db: str = DB_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Per release: devices running, installing, failed (by reason), stale; its monitoring
    (drift, confidence, the canary comparison with the previous revision); the rollout
    decisions; the drifting, stale and unseen devices.

    Exits 4 when a release has failed devices among fresh reports (after printing
    everything), so a monitoring timer can alert on it; 0 otherwise.
    """
    from edgepack.errors import VerificationError
    from edgepack.fleet.summary import fleet_status

    stale_s = parse_duration(stale_after, "--stale-after")
    unseen_s = None if unseen_since is None else parse_duration(unseen_since, "--unseen-since")
    now = time.time()
    store = _open(db)
    try:
        status = fleet_status(
            store,
            model=model,
            channel=channel,
            now=now,
            stale_after_s=stale_s,
            unseen_since=None if unseen_s is None else now - unseen_s,
        )
    finally:
        store.close()
    emit(status, as_json, lambda: _print_status(status))
    failing = [r for r in status["releases"] if r["failed"]]
    if failing:
        raise VerificationError(
            "failed devices: "
            + ", ".join(
                f"{r['model']}/{r['channel']} {r['version']} ({sum(r['failed'].values())})"
                for r in failing
            ),
            hint="see the table; `edgepack fleet show DEVICE` for one device",
        )


SHOWN_DEVICES = 20
"""``fleet status`` lists at most this many stale or unseen devices (``--json``: all)."""


def _print_status(status: dict[str, Any]) -> None:
    from rich.table import Table

    from edgepack.fleet.dashboard import age

    console = _console()
    by_channel: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in status["releases"]:
        by_channel.setdefault((r["model"], r["channel"]), []).append(r)
    last: dict[tuple[str, str, str], dict[str, Any]] = {}
    for d in sorted(status["decisions"], key=lambda d: d["decided_at"]):
        last[(d["model"], d["channel"], d["version"])] = d
    if not by_channel:
        console.print("no device has reported a release yet", markup=False)
    for (name, chan), releases in sorted(by_channel.items()):
        table = Table(title=f"{name} on {chan}", title_justify="left")
        table.add_column("release")
        for column in ("running", "installing", "stale"):
            table.add_column(column, justify="right")
        table.add_column("failed (by reason)", max_width=40)
        table.add_column("rate", justify="right")
        table.add_column("decision")
        for r in releases:
            rate = r["failure_rate"]
            decision = last.get((name, chan, r["version"]))
            table.add_row(
                r["version"],
                str(r["running"]),
                str(r["installing"]),
                str(r["stale"]),
                "\n".join(f"{n} {why}" for why, n in r["failed"].items()) or "0",
                "—" if rate is None else f"{rate * 100:.0f}%",
                f"{decision['action']} at {decision['step']:g}%" if decision else "",
            )
        console.print(table)
    if status["decisions"]:
        table = Table(title="decisions", title_justify="left")
        table.add_column("when", no_wrap=True)
        for column in ("action", "release", "rollout", "reason"):
            table.add_column(column)
        for d in sorted(status["decisions"], key=lambda d: d["decided_at"]):
            table.add_row(
                _when(d["decided_at"]),
                d["action"],
                f"{d['model']}/{d['channel']} {d['version']}",
                f"{d['step']:g}%",
                d["reason"],
            )
        console.print(table)
    _print_drift(console, status)
    stale = [d for d in status["devices"] if d["stale"] and not d["revoked"]]
    stale_s = float(status["stale_after_s"])
    for title, ids in (
        (f"stale (no fresh report in {age(stale_s)})", [d["device_id"] for d in stale]),
        ("unseen", list(status["unseen"])),
    ):
        if not ids:
            continue
        seen = {d["device_id"]: d["last_seen"] for d in status["devices"]}
        console.print(f"{len(ids)} {title}:", markup=False)
        for device_id in ids[:SHOWN_DEVICES]:
            console.print(f"  {device_id}  last seen {_when(seen.get(device_id))}", markup=False)
        if len(ids) > SHOWN_DEVICES:
            console.print(
                f"  … and {len(ids) - SHOWN_DEVICES} more (--json lists all)", markup=False
            )


def _figure(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _print_drift(console: Any, status: dict[str, Any]) -> None:
    """Per release, the monitoring figures and the canary comparison; the drifting devices."""
    from rich.table import Table

    watched = [r for r in status["releases"] if r.get("monitoring")]
    if watched:
        table = Table(title="monitoring (fresh devices)", title_justify="left")
        table.add_column("release")
        for column in ("reporting", "alerting", "median PSI", "confidence"):
            table.add_column(column, justify="right")
        compared = []
        for r in watched:
            mon = r["monitoring"]
            canary = mon["canary"]
            if canary is not None:
                compared.append(
                    f"  {r['model']}/{r['channel']} {r['version']}: mean confidence "
                    f"{canary['change']:+.3f} ({_figure(canary['confidence'])} vs "
                    f"{_figure(canary['previous_confidence'])}, n={canary['devices']})"
                )
            table.add_row(
                f"{r['model']}/{r['channel']} {r['version']}",
                str(mon["reporting"]),
                str(mon["alerting"]),
                _figure(mon["median_drift_psi"]),
                _figure(mon["mean_confidence"]),
            )
        console.print(table)
        if compared:
            console.print("canary: against the previous revision on the same devices", markup=False)
            for line in compared:
                console.print(line, markup=False, soft_wrap=True)
    drifting = status.get("drifting") or []
    if not drifting:
        return
    console.print(f"{len(drifting)} drifting (monitoring alerts):", markup=False)
    for d in drifting[:SHOWN_DEVICES]:
        console.print(
            f"  {d['device_id']}  {d['model']} {d['version']} ({d['revision']}): "
            f"{', '.join(d['alerts'])}; PSI {_figure(d['drift_psi'])}, anomalies "
            f"{d['anomaly_rate'] * 100:.1f}%, confidence {_figure(d['mean_confidence'])}",
            markup=False,
            soft_wrap=True,
        )
    if len(drifting) > SHOWN_DEVICES:
        console.print(
            f"  … and {len(drifting) - SHOWN_DEVICES} more (--json lists all)", markup=False
        )


def register(app: typer.Typer) -> None:
    """Add the ``fleet`` command group to ``app``."""
    from edgepack.cli import _fleet_watch

    _fleet_watch.register(fleet_app)
    app.add_typer(fleet_app)
