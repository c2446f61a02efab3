"""``edgepack-agent enroll`` and ``edgepack-agent retry``: the device's configuration,
and forgetting failures that the configuration, not the release, caused."""

from __future__ import annotations

from pathlib import Path

import typer

from device_agent import config as config_mod
from edgepack._cli_output import JSON_OPTION, emit

DATA_DIR_OPTION = typer.Option(
    None,
    "--data-dir",
    envvar="EDGEPACK_DATA_DIR",
    help="The agent's data directory (default /var/lib/edgepack).",
)
PASSPHRASE_ENV_OPTION = typer.Option(
    None,
    "--passphrase-env",
    metavar="VAR",
    help=(
        "Read the recipient key's passphrase from this environment variable (default: "
        "EDGEPACK_PASSPHRASE, else the systemd credential edgepack-passphrase, else a prompt)."
    ),
)


def register(app: typer.Typer) -> None:
    """Add the ``enroll`` and ``retry`` commands to the agent's app."""

    @app.command("enroll")
    def enroll_command(
        repo_url: str = typer.Option(
            ..., "--repo-url", help="Repository URL (http, https, file), or a directory copy."
        ),
        root: Path = typer.Option(..., "--root", help="The repository's trusted root.json."),
        model: list[str] = typer.Option(
            ..., "--model", help="A model to follow (required; repeat for more)."
        ),
        channel: str = typer.Option("stable", "--channel", help="stable, candidate, beta or edge."),
        cohort: str = typer.Option("", "--cohort", help="Rollout cohort of this device."),
        profile: str = typer.Option("auto", "--profile", help="Hardware profile, or auto."),
        trust: Path | None = typer.Option(None, "--trust", help="Producer trust policy or .pub."),
        recipient_key: Path | None = typer.Option(
            None,
            "--recipient-key",
            help="Decrypt with (a copy of) this X25519 key, e.g. a fleet key, not the device's own.",
        ),
        ca_file: Path | None = typer.Option(
            None,
            "--ca-file",
            help="Verify the repository's HTTPS against these CA certificates (PEM) only.",
        ),
        proxy: str | None = typer.Option(
            None, "--proxy", help="HTTP(S) proxy URL (default: https_proxy / http_proxy)."
        ),
        fleet_url: str | None = typer.Option(
            None,
            "--fleet-url",
            help="The fleet service (http, https) that takes this device's signed reports.",
        ),
        at_rest: str | None = typer.Option(
            None,
            "--at-rest",
            help="How installed models are kept: encrypted (default; decrypted into memory "
            "by open_session) or plain (files an application can open by path).",
        ),
        key_protection: str | None = typer.Option(
            None,
            "--key-protection",
            metavar="file|tpm",
            help="What protects the device's keys at rest: files readable by the agent only "
            "(default), or sealed by the TPM 2.0 (see docs/agent.md, Keys at rest).",
        ),
        tpm_tcti: str | None = typer.Option(
            None,
            "--tpm-tcti",
            metavar="TCTI",
            help="How to reach the TPM (default device:/dev/tpmrm0), e.g. "
            "swtpm:host=127.0.0.1,port=2321.",
        ),
        passphrase_env: str | None = PASSPHRASE_ENV_OPTION,
        data_dir: Path | None = DATA_DIR_OPTION,
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Pin the trusted root, make the device's identity, take its recipient key, write
        the configuration (re-enrolling keeps the identity, the id and [limits])."""
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
            passphrase_env=passphrase_env,
            ca_file=ca_file,
            proxy=proxy,
            fleet_url=fleet_url,
            key_protection=key_protection,
            tpm_tcti=tpm_tcti,
            at_rest=at_rest,
        )
        data = {
            "device_id": result.device_id,
            "identity_public_key": str(result.identity_key),
            "identity": f"ed25519:{result.identity}",
            "recipient_public_key": str(result.public_key),
            "public_key": str(result.public_key),  # the recipient's, as before
            "config": str(result.config_path),
            "record": str(result.record),
            "cleared_failures": list(result.cleared),
            "warnings": list(result.warnings),
        }
        for warning in result.warnings:
            typer.echo(f"edgepack-agent: warning: {warning}", err=True)

        def human() -> None:
            typer.echo(f"device id:      {result.device_id}")
            typer.echo(f"identity key:   {result.identity_key} (ed25519:{result.identity})")
            typer.echo(f"recipient key:  {result.public_key} (pack bundles for it: --recipient)")
            typer.echo(
                f"enrolment:      {result.record} "
                f"(register it: edgepack fleet register {result.record})"
            )
            if result.cleared:
                typer.echo(
                    f"failures forgotten (the key, trust, profile or channel changed): "
                    f"{', '.join(result.cleared)}"
                )

        emit(data, as_json, human)

    @app.command("retry")
    def retry_command(
        name: str = typer.Argument(..., help="The model whose failed releases to try again."),
        data_dir: Path | None = DATA_DIR_OPTION,
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Forget that releases of NAME failed here; the next poll tries them again.

        For a failure that was the device's doing (a key, trust policy or disk since
        mended). The running model is not touched.
        """
        from device_agent.agent import Agent

        data = config_mod.resolve_data_dir(data_dir)
        agent = Agent(config_mod.load(data))
        with agent.exclusive():
            cleared = agent.retry(name)

        def human() -> None:
            if cleared:
                typer.echo(f"{name}: forgot {', '.join(cleared)}; the next poll tries again")
            else:
                typer.echo(f"{name}: no release had failed here")

        emit({"model": name, "action": "retry", "cleared": cleared}, as_json, human)
