"""``edgepack keys wrap``: per-device key envelopes for a published release.

The content key is recovered from the bundle's own recipient list with
``--open-with`` (a key no device holds: the publisher's or a group's), then
sealed to each device's recipient key and published as TUF targets of the
``envelopes`` role (docs/repository.md, "Per-device key envelopes and revocation").
"""

from __future__ import annotations

from pathlib import Path

import typer

from edgepack._cli_output import JSON_OPTION, emit
from edgepack.cli._repo import OPERATOR_KEY, PASSPHRASE_ENV, REPO_OPTION, _passphrases

SHOWN_SKIPPED = 20
"""The human output names at most this many skipped devices (``--json``: all)."""


def wrap_command(
    bundles: list[Path] = typer.Argument(
        ..., metavar="BUNDLE...", help="The published bundle(s) of one release (one per profile)."
    ),
    workdir: Path = REPO_OPTION,
    key: str | None = OPERATOR_KEY,
    open_with: Path = typer.Option(
        ...,
        "--open-with",
        metavar="KEY",
        help="A recipient private key the bundle was packed for (publisher or group), "
        "to recover its content key.",
    ),
    devices: Path = typer.Option(
        ...,
        "--devices",
        metavar="FILE_OR_DIR",
        help="Enrolment records (DATA/keys/enrolment.json): one file, a directory of them, "
        "or a JSON list of them.",
    ),
    passphrase_env: str | None = PASSPHRASE_ENV,
    as_json: bool = JSON_OPTION,
) -> None:
    """Publish one key envelope per device for a release, signed by the operators' key.

    Each device then finds its own envelope (keys/NAME/VERSION/DEVICE.json), in one small
    hash bin. Devices revoked with `edgepack fleet revoke-device --repo` are skipped, and
    so are devices whose envelope already holds their key; each skip is said.
    """
    from edgepack.keys import load_recipient_private_key
    from edgepack.repo import _envelopes

    opener = load_recipient_private_key(open_with, passphrase_env)
    releases = [_envelopes.release_of(b, opener) for b in bundles]
    found, unusable = _envelopes.load_devices(devices)
    result = _envelopes.wrap(
        workdir, releases, found, passphrase=_passphrases(passphrase_env), key=key
    )
    skipped = unusable + result.summary["skipped"]
    wrapped = result.summary["wrapped"]
    release = f"{releases[0].name} {releases[0].version}"
    data = {
        "model": releases[0].name,
        "version": releases[0].version,
        "versions": result.versions,
        "wrapped": wrapped,
        "skipped": skipped,
        "bins": result.summary["bins"],
    }

    def human() -> None:
        typer.echo(
            f"wrapped the key of {release} for {len(wrapped)} device(s) "
            f"in {result.summary['bins']} hash bins"
        )
        for entry in skipped[:SHOWN_SKIPPED]:
            typer.echo(f"skipped {entry['device_id']}: {entry['reason']}")
        if len(skipped) > SHOWN_SKIPPED:
            typer.echo(f"… and {len(skipped) - SHOWN_SKIPPED} more skipped (--json lists all)")

    emit(data, as_json, human)


def prune_command(
    name: str = typer.Argument(..., metavar="NAME", help="The model."),
    versions: list[str] = typer.Argument(..., metavar="VERSION...", help="Releases to prune."),
    workdir: Path = REPO_OPTION,
    key: str | None = OPERATOR_KEY,
    passphrase_env: str | None = PASSPHRASE_ENV,
    as_json: bool = JSON_OPTION,
) -> None:
    """Withdraw every key envelope of these releases.

    Envelopes stay until pruned, so the bins every device reads would grow with
    releases times devices; pruning keeps them at the size of the releases kept. A release a channel still names, as current or previous,
    is refused: a device may still need its key.
    """
    from edgepack.repo import _envelopes

    result = _envelopes.prune(
        workdir, name, versions, passphrase=_passphrases(passphrase_env), key=key
    )
    emit(
        {"versions": result.versions, **result.summary},
        as_json,
        lambda: typer.echo(
            f"withdrew {result.summary['withdrawn']} key envelope(s) of {name} "
            f"{', '.join(versions)} ({result.summary['bins']} hash bins)"
        ),
    )


def register(keys_app: typer.Typer) -> None:
    """Add ``keys wrap`` and ``keys prune`` to the ``keys`` group."""
    keys_app.command("wrap")(wrap_command)
    keys_app.command("prune")(prune_command)
