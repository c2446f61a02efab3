"""Repository and operator commands: ``edgepack repo …``, ``publish``, ``promote``,
``rollback``, ``revoke`` and ``keys rotate``.

Keys are PEM files or securesystemslib signer URIs; passphrases come from
``$EDGEPACK_PASSPHRASE`` (or ``--passphrase-env VAR``), else a prompt on a
terminal, else a clear error. Every reporting command takes ``--json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from edgepack import repo
from edgepack._cli_output import JSON_OPTION, emit
from edgepack.errors import InvalidInputError
from edgepack.keys import resolve_passphrase

repo_app = typer.Typer(
    name="repo",
    help="Create, inspect, refresh and serve a TUF repository.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

PASSPHRASE_ENV = typer.Option(
    None,
    "--passphrase-env",
    metavar="VAR",
    help="Read key passphrases from this variable (default EDGEPACK_PASSPHRASE, else a prompt).",
)
REPO_OPTION = typer.Option(..., "--repo", metavar="WORKDIR", help="The repository's directory.")
OPERATOR_KEY = typer.Option(
    None,
    "--key",
    metavar="KEY",
    help="Operators' key: PEM file or signer URI (default: WORKDIR/keys/operators.key).",
)


def _passphrases(passphrase_env: str | None) -> repo.PassphraseSource:
    """Ask once, on first need, and reuse the answer for every key of the command."""
    cache: dict[str, bytes | None] = {}

    def source(purpose: str) -> bytes | None:
        if "value" not in cache:
            cache["value"] = resolve_passphrase(
                passphrase_env, purpose="the repository keys", required=True
            )
        return cache["value"]

    return source


def _versions(result: repo.Result) -> str:
    return ", ".join(f"{role} v{v}" for role, v in sorted(result.versions.items())) or "nothing"


def _parse_expiry(values: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in values:
        role, sep, days = item.partition("=")
        try:
            out[role] = float(days)
        except ValueError:
            sep = ""
        if not sep:
            raise InvalidInputError(
                f"bad --expiry {item!r}", hint="use ROLE=DAYS, e.g. timestamp=1"
            )
    return out


@repo_app.command("init")
def init_command(
    workdir: Path = typer.Argument(..., help="New repository directory."),
    root_keys: int = typer.Option(1, "--root-keys", min=1, help="Number of root keys (n)."),
    root_threshold: int = typer.Option(1, "--root-threshold", min=1, help="Root threshold (k)."),
    expiry: list[str] = typer.Option(
        [],
        "--expiry",
        metavar="ROLE=DAYS",
        help="Expiry of a role (root, targets, snapshot, timestamp, operators, models).",
    ),
    no_passphrase: bool = typer.Option(
        False, "--no-passphrase", help="Write unencrypted keys (development only)."
    ),
    passphrase_env: str | None = PASSPHRASE_ENV,
    as_json: bool = JSON_OPTION,
) -> None:
    """Create the role keys (WORKDIR/keys) and the first metadata (WORKDIR/public)."""
    expiry_days = _parse_expiry(expiry)
    passphrase = None
    if not no_passphrase:
        passphrase = resolve_passphrase(
            passphrase_env, purpose="the new repository keys", required=True, confirm=True
        )
    result = repo.init(
        workdir,
        passphrase=passphrase,
        root_keys=root_keys,
        root_threshold=root_threshold,
        expiry_days=expiry_days,
    )
    if passphrase is None:
        typer.echo(
            f"edgepack: warning: the role keys in {workdir / 'keys'} are NOT encrypted "
            "(--no-passphrase): anyone who can read them can sign for the repository",
            err=True,
        )
    data = {"versions": result.versions, **result.summary, "encrypted": passphrase is not None}

    def human() -> None:
        typer.echo(f"created repository {workdir}: {_versions(result)}")
        typer.echo(f"private keys in {workdir / 'keys'}; serve {workdir / 'public'}")

    emit(data, as_json, human)


@repo_app.command("add-model")
def add_model_command(
    workdir: Path = typer.Argument(..., help="The repository."),
    name: str = typer.Argument(..., help="Model name."),
    key: Path = typer.Option(..., "--key", metavar="TEAM.pub", help="The team's public key."),
    targets_key: str | None = typer.Option(
        None, "--targets-key", metavar="KEY", help="Top-level targets key (PEM or signer URI)."
    ),
    passphrase_env: str | None = PASSPHRASE_ENV,
    as_json: bool = JSON_OPTION,
) -> None:
    """Delegate models/NAME/* to a model team's key."""
    result = repo.add_model(
        workdir, name, key, passphrase=_passphrases(passphrase_env), key=targets_key
    )
    emit(
        {"versions": result.versions, **result.summary},
        as_json,
        lambda: typer.echo(f"model {name} delegated to key {result.summary['keyid'][:12]}…"),
    )


@repo_app.command("refresh")
def refresh_command(
    workdir: Path = typer.Argument(..., help="The repository."),
    force: bool = typer.Option(False, "--force", help="Re-sign even when nothing is due."),
    role: str | None = typer.Option(
        None,
        "--role",
        metavar="ROLE",
        help="Re-sign this role now with a new expiry: root, targets, operators, "
        "model-NAME (with --key), snapshot or timestamp.",
    ),
    key: str | None = typer.Option(
        None, "--key", metavar="KEY", help="Key for --role (PEM or signer URI)."
    ),
    passphrase_env: str | None = PASSPHRASE_ENV,
    as_json: bool = JSON_OPTION,
) -> None:
    """Re-sign snapshot and timestamp when inside their refresh window (quiet otherwise).

    With --role, re-sign that role (and snapshot, timestamp) now: for roles no
    daily work re-signs, before `repo status` warns they expire.
    """
    source = _passphrases(passphrase_env)
    if role is not None:
        result = repo.resign(workdir, role, passphrase=source, key=key)
    else:
        result = repo.refresh(workdir, passphrase=source, force=force)

    def human() -> None:
        if result.versions:
            typer.echo(f"refreshed: {_versions(result)}")

    emit({"versions": result.versions, **result.summary}, as_json, human)


@repo_app.command("status")
def status_command(
    workdir: Path = typer.Argument(..., help="The repository."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Roles, versions, expiries (with early warnings), models, releases, channels.

    Exits 4 when a role has expired (devices refuse the repository until it is
    re-signed), so a monitoring timer can run it; a role inside its warning window
    is a warning on stderr and exit 0.
    """
    report = repo.open_status(workdir)
    emit(report, as_json, lambda: _print_status(report))
    expired = [r["role"] for r in report["roles"] if r["state"] == "expired"]
    if expired:
        from edgepack.errors import VerificationError

        raise VerificationError(
            f"expired: {', '.join(expired)} (devices refuse this repository's metadata)",
            hint="re-sign with `edgepack repo refresh WORKDIR --force` "
            "(or `--role ROLE` for root, targets, operators and model roles)",
        )


def _plural(count: float, word: str) -> str:
    """``1 release``, ``2 releases``, ``0.5 days``."""
    return f"{count:g} {word}" if count == 1 else f"{count:g} {word}s"


def _days_left(days: float, state: str) -> str:
    """A role's time left for a person: ``12.5 days``, ``expired``, ``expired 3 days ago``."""
    if state == "expired" or days <= 0:
        ago = round(-days, 2)
        return f"expired {_plural(ago, 'day')} ago" if ago > 0 else "expired"
    return _plural(days, "day")


def _print_status(report: dict[str, Any]) -> None:
    typer.echo("roles:")
    for r in report["roles"]:
        mark = "" if r["state"] == "ok" else f"  <-- {r['state'].upper()}"
        typer.echo(
            f"  {r['role']:<24} v{r['version']:<5} expires {r['expires']} "
            f"({_days_left(float(r['days_left']), r['state'])}){mark}"
        )
    typer.echo("models:")
    for m in report["models"]:
        bins = f", {_plural(m['bins'], 'bin')}" if m["bins"] else ""
        typer.echo(f"  {m['name']} ({_plural(len(m['releases']), 'release')}{bins})")
        for version, variants in m["releases"].items():
            typer.echo(f"    {version}: {', '.join(variants)}")
    typer.echo("channels:")
    for c in report["channels"]:
        cur = c["current"]
        now = "none" if cur is None else f"{cur['version']} at {cur['rollout']:g}%"
        if cur and cur["cohorts"]:
            now += f" for {', '.join(cur['cohorts'])}"
        extra = f"; revoked {', '.join(c['revoked'])}" if c["revoked"] else ""
        typer.echo(f"  {c['model']}/{c['channel']} #{c['sequence']}: {now}{extra}")
    for warning in report["warnings"]:
        typer.echo(f"warning: {warning}", err=True)


@repo_app.command("log")
def log_command(
    workdir: Path = typer.Argument(..., help="The repository."),
    model: str | None = typer.Option(None, "--model", metavar="M", help="Only this model."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Who did what: every publish, promote, rollout, rollback, revoke and key rotation.

    Rebuilt from the repository's own signed metadata history (every version
    of every role), each version's signatures checked. A version that fails
    its check is listed as ``unverified`` and the command exits 4.
    """
    entries, verified = repo.audit_log(workdir, model=model)
    emit([e.to_dict() for e in entries], as_json, lambda: _print_log(entries))
    if not verified:
        from edgepack.errors import VerificationError

        bad = [f"{e.role} v{e.role_version}" for e in entries if e.action == "unverified"]
        raise VerificationError(
            f"tampering detected: {', '.join(bad)} fail their signature check",
            hint="restore public/metadata and public/targets from a backup and investigate",
        )


def _print_log(entries: list[repo.LogEntry]) -> None:
    if not entries:
        typer.echo("no entries")
    for e in entries:
        subject = "/".join(x for x in (e.model, e.channel) if x) or "-"
        keys = ",".join(k[:12] for k in e.keyids) or "-"
        versions = ",".join(e.versions) or "-"
        typer.echo(
            f"{e.time or '?':<20}  {e.action:<13} {subject:<22} {versions:<12} "
            f"{e.role} v{e.role_version} by {keys}  {e.detail}"
        )


@repo_app.command("serve")
def serve_command(
    workdir: Path = typer.Argument(..., help="The repository."),
    host: str = typer.Option("127.0.0.1", "--host", help="Loopback address to bind."),
    port: int = typer.Option(8080, "--port", help="Port (0 picks a free one)."),
) -> None:
    """Serve WORKDIR/public over HTTP for development (use nginx in production)."""
    server = repo.make_server(workdir, host, port)
    bound = server.server_address[1]
    typer.echo(f"serving {workdir / 'public'} on http://{host}:{bound}/ (Ctrl-C stops)")
    typer.echo(
        f"  metadata: http://{host}:{bound}/metadata/  targets: http://{host}:{bound}/targets/"
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()


def publish_command(
    bundles: list[Path] = typer.Argument(..., help="Bundle files (.epk)."),
    workdir: Path = REPO_OPTION,
    key: str = typer.Option(..., "--key", metavar="TEAM.key", help="Team key: PEM or signer URI."),
    channel: str | None = typer.Option(None, "--channel", help="Also promote to this channel."),
    operator_key: str | None = typer.Option(
        None, "--operator-key", metavar="KEY", help="Operators' key, with --channel."
    ),
    trust: Path | None = typer.Option(
        None,
        "--trust",
        metavar="POLICY",
        help="Check each producer signature first (trust policy file or producer .pub).",
    ),
    passphrase_env: str | None = PASSPHRASE_ENV,
    as_json: bool = JSON_OPTION,
) -> None:
    """Add bundles as targets under the model team's role."""
    from edgepack.signing import load_trust_policy

    result = repo.publish(
        workdir,
        bundles,
        key=key,
        passphrase=_passphrases(passphrase_env),
        channel=channel,
        operator_key=operator_key,
        policy=load_trust_policy(trust) if trust else None,
    )

    def human() -> None:
        for target in result.summary["targets"]:
            typer.echo(f"published {target}")
        if channel:
            typer.echo(f"promoted to {channel}")

    emit({"versions": result.versions, **result.summary}, as_json, human)


def _emit_documents(
    result: repo.Result, as_json: bool, extra: dict[str, Any] | None = None
) -> None:
    def human() -> None:
        for doc in result.summary["documents"]:
            cur = doc["current"]
            now = "none" if cur is None else f"{cur['version']} at {cur['rollout']:g}%"
            typer.echo(f"{doc['model']}/{doc['channel']} #{doc['sequence']}: {now}")

    emit({"versions": result.versions, **result.summary, **(extra or {})}, as_json, human)


def promote_command(
    name: str = typer.Argument(..., help="Model name."),
    version: str = typer.Argument(..., help="Published version."),
    workdir: Path = REPO_OPTION,
    channel: str = typer.Option(..., "--channel", help="stable, candidate, beta or edge."),
    rollout: float = typer.Option(100.0, "--rollout", metavar="PERCENT", help="Staged rollout."),
    cohort: list[str] = typer.Option([], "--cohort", metavar="NAME", help="Restrict to cohort."),
    halt_on_failure: str | None = typer.Option(
        None,
        "--halt-on-failure",
        metavar="PERCENT",
        help="Have `edgepack fleet watch` watch this rollout: stop it when this share of "
        "fresh devices fails it (5% or 5).",
    ),
    min_devices: str | None = typer.Option(
        None,
        "--min-devices",
        metavar="N",
        help="With --halt-on-failure: decide only once N fresh devices report (default 1).",
    ),
    on_failure: str | None = typer.Option(
        None,
        "--on-failure",
        metavar="halt|rollback",
        help="What crossing the threshold does: halt (stop widening) or rollback (default halt).",
    ),
    halt_on_confidence_drop: str | None = typer.Option(
        None,
        "--halt-on-confidence-drop",
        metavar="DROP",
        help="Watch the rollout's monitoring: stop it when the release's mean confidence is "
        "more than DROP (0 to 1, e.g. 0.05) under the previous revision's on the same devices.",
    ),
    halt_on_drift_alerts: str | None = typer.Option(
        None,
        "--halt-on-drift-alerts",
        metavar="PERCENT",
        help="Watch the rollout's monitoring: stop it when this share of fresh devices "
        "reporting monitoring raise an alert (20% or 20).",
    ),
    widen: str | None = typer.Option(
        None,
        "--widen",
        metavar="STEPS",
        help="Rollout percentages to widen through while healthy, e.g. 25,50,100.",
    ),
    widen_after: str | None = typer.Option(
        None,
        "--widen-after",
        metavar="DURATION",
        help="With --widen: time healthy at each step before the next (30s, 10m, 6h, 2d).",
    ),
    key: str | None = OPERATOR_KEY,
    passphrase_env: str | None = PASSPHRASE_ENV,
    as_json: bool = JSON_OPTION,
) -> None:
    """Make a release current on a channel (optionally staged or for cohorts).

    With --halt-on-failure the rollout is recorded in WORKDIR/rollouts.json for
    `edgepack fleet watch`, which halts, rolls back or widens it; a promote
    without these options stops watching the channel.
    """
    from dataclasses import asdict

    from edgepack.repo._rollouts import OPTIONAL_POLICY_KEYS, BadOptionError, make_policy

    devices: int | None = None
    if min_devices is not None:
        if not min_devices.strip().isdigit():
            raise BadOptionError(f"--min-devices takes a whole number, not {min_devices!r}")
        devices = int(min_devices)
    policy = make_policy(
        halt_on_failure=halt_on_failure,
        min_devices=devices,
        on_failure=on_failure,
        widen=widen,
        widen_after=widen_after,
        rollout=rollout,
        halt_on_confidence_drop=halt_on_confidence_drop,
        halt_on_drift_alerts=halt_on_drift_alerts,
    )
    result = repo.promote(
        workdir,
        name,
        version,
        channel=channel,
        rollout=rollout,
        cohorts=cohort,
        key=key,
        passphrase=_passphrases(passphrase_env),
        policy=policy,
    )
    watched = None if policy is None else {**asdict(policy), "widen": list(policy.widen)}
    for optional in OPTIONAL_POLICY_KEYS:
        if watched is not None and watched[optional] is None:
            del watched[optional]  # as in rollouts.json: only the policies given
    _emit_documents(result, as_json, {"rollout_policy": watched})
    if policy is not None and not as_json:
        steps = f"; widen to {', '.join(f'{s:g}%' for s in policy.widen)}" if policy.widen else ""
        when = [
            f"{policy.halt_on_failure * 100:g}% failures"
            if policy.halt_on_failure is not None
            else "",
            f"a confidence drop over {policy.halt_on_confidence_drop:g}"
            if policy.halt_on_confidence_drop is not None
            else "",
            f"{policy.halt_on_drift_alerts * 100:g}% drift alerts"
            if policy.halt_on_drift_alerts is not None
            else "",
        ]
        typer.echo(
            f"watched: {policy.on_failure} at {' or '.join(w for w in when if w)} "
            f"of at least {policy.min_devices} fresh devices{steps}"
        )


def rollback_command(
    name: str = typer.Argument(..., help="Model name."),
    workdir: Path = REPO_OPTION,
    channel: str = typer.Option(..., "--channel", help="stable, candidate, beta or edge."),
    to: str | None = typer.Option(None, "--to", metavar="VERSION", help="Default: the previous."),
    key: str | None = OPERATOR_KEY,
    passphrase_env: str | None = PASSPHRASE_ENV,
    as_json: bool = JSON_OPTION,
) -> None:
    """Move a channel back to an older release (a new, newer channel document)."""
    result = repo.rollback(
        workdir,
        name,
        channel=channel,
        to_version=to,
        key=key,
        passphrase=_passphrases(passphrase_env),
    )
    _emit_documents(result, as_json)


def revoke_command(
    name: str = typer.Argument(..., help="Model name."),
    version: str = typer.Argument(..., help="Version to revoke."),
    workdir: Path = REPO_OPTION,
    key: str | None = OPERATOR_KEY,
    passphrase_env: str | None = PASSPHRASE_ENV,
    as_json: bool = JSON_OPTION,
) -> None:
    """List a release as revoked on every channel: never installed, never reverted to."""
    result = repo.revoke(workdir, name, version, key=key, passphrase=_passphrases(passphrase_env))
    _emit_documents(result, as_json)


def rotate_command(
    role: str = typer.Argument(..., help="root, targets, snapshot, timestamp or operators."),
    workdir: Path = REPO_OPTION,
    new_key: list[str] = typer.Option(
        [],
        "--new-key",
        metavar="KEY",
        help="Use this key instead of generating one: signer URI (hsm:, gcpkms:, awskms:, "
        "azurekms:, hv:, file2:) or PEM file; repeat for several, each with --new-public.",
    ),
    new_public: list[Path] = typer.Option(
        [], "--new-public", metavar="PUB", help="Public key (PEM) of each --new-key, in order."
    ),
    no_passphrase: bool = typer.Option(
        False, "--no-passphrase", help="Write a generated key unencrypted (development only)."
    ),
    passphrase_env: str | None = PASSPHRASE_ENV,
    as_json: bool = JSON_OPTION,
) -> None:
    """Replace a role's key; root rotation follows TUF's root chain."""
    if len(new_key) != len(new_public):
        raise InvalidInputError(
            "give one --new-public for every --new-key", hint="pair them in the same order"
        )
    source = _passphrases(passphrase_env)
    new_passphrase = None if no_passphrase or new_key else source("the new key")
    result = repo.rotate_key(
        workdir,
        role,
        passphrase=source,
        new_passphrase=new_passphrase,
        replacements=list(zip(new_key, new_public, strict=True)),
    )
    emit(
        {"versions": result.versions, **result.summary},
        as_json,
        lambda: typer.echo(
            f"rotated {role}: new key {', '.join(result.summary['keys'])}; {_versions(result)}"
        ),
    )


def register_keys_rotate(keys_app: typer.Typer) -> None:
    """Add ``keys rotate`` to the ``keys`` group (edgepack/cli/_keys.py)."""
    keys_app.command("rotate")(rotate_command)


def register(app: typer.Typer) -> None:
    """Add ``repo`` and the operator commands to ``app``."""
    app.add_typer(repo_app)
    app.command("publish")(publish_command)
    app.command("promote")(promote_command)
    app.command("rollback")(rollback_command)
    app.command("revoke")(revoke_command)
