"""``edgepack keys …``: producer signing keys and recipient (device or fleet) keys."""

from __future__ import annotations

import enum
from pathlib import Path

import typer

from edgepack._cli_output import JSON_OPTION, emit
from edgepack.errors import InvalidInputError
from edgepack.keys import (
    DEFAULT_PASSPHRASE_ENV,
    generate_recipient_key,
    generate_signing_key,
    resolve_passphrase,
    write_keypair,
)

keys_app = typer.Typer(
    name="keys", help="Create and manage keys.", no_args_is_help=True, rich_markup_mode=None
)


class KeyKindChoice(str, enum.Enum):
    """The kinds of key ``keys generate`` makes."""

    signing = "signing"
    recipient = "recipient"


PASSPHRASE_ENV_OPTION = typer.Option(
    None,
    "--passphrase-env",
    metavar="VAR",
    help=(
        "Read the passphrase from this environment variable (default: EDGEPACK_PASSPHRASE, "
        "else the systemd credential edgepack-passphrase, else a prompt)."
    ),
)


SIGN_KEY_OPTION = typer.Option(
    None,
    "--sign-key",
    metavar="KEY",
    help="EC P-256 producer signing key (with --sign-cert: its key).",
)
SIGN_CERT_OPTION = typer.Option(
    None,
    "--sign-cert",
    metavar="CERT",
    help="X.509 certificate of --sign-key: sign with a certificate chain.",
)
SIGN_CHAIN_OPTION = typer.Option(
    [],
    "--sign-chain",
    metavar="PEM",
    help="Intermediate/root certificates of --sign-cert (repeatable).",
)
SIGSTORE_OPTION = typer.Option(
    False, "--sigstore", help="Sigstore keyless signing (OIDC; needs network access to sigstore)."
)


@keys_app.command("generate")
def generate(
    kind: KeyKindChoice = typer.Argument(
        ..., help="signing: EC P-256 producer key; recipient: X25519 device/fleet key."
    ),
    output: Path = typer.Option(
        ..., "-o", "--output", metavar="PATH", help="Writes PATH.key (0600) and PATH.pub."
    ),
    passphrase_env: str | None = PASSPHRASE_ENV_OPTION,
    no_passphrase: bool = typer.Option(
        False,
        "--no-passphrase",
        help="Write the private key unencrypted, on purpose (development and tests only).",
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Generate a key pair: PATH.key (private, 0600, passphrase-protected) and PATH.pub.

    The passphrase comes from $EDGEPACK_PASSPHRASE (or the variable --passphrase-env
    names), else the systemd credential edgepack-passphrase, else a prompt; with none
    of them the command refuses (exit 5), as `repo init` does. --no-passphrase writes
    an unencrypted key on purpose, and says so on stderr.
    """
    if no_passphrase and passphrase_env is not None:
        raise InvalidInputError("--no-passphrase and --passphrase-env contradict each other")
    passphrase = None
    if not no_passphrase:
        passphrase = resolve_passphrase(
            passphrase_env,
            purpose=f"the new {kind.value} key",
            required=True,
            confirm=True,
            missing_hint=(
                f"set ${DEFAULT_PASSPHRASE_ENV} (or name a variable with --passphrase-env), "
                "or pass --no-passphrase to write an unencrypted key on purpose"
            ),
        )
    key = generate_signing_key() if kind is KeyKindChoice.signing else generate_recipient_key()
    paths = write_keypair(output, key, passphrase)
    if passphrase is None:
        typer.echo(
            f"edgepack: warning: {paths.private} is NOT encrypted (--no-passphrase): "
            "anyone who can read the file can use the key",
            err=True,
        )
    result = {
        "kind": kind.value,
        "private_key": str(paths.private),
        "public_key": str(paths.public),
        "encrypted": passphrase is not None,
    }

    def human() -> None:
        state = "encrypted" if passphrase else "NOT encrypted"
        typer.echo(f"wrote {paths.private} (private, mode 0600, {state})")
        typer.echo(f"wrote {paths.public} (public)")

    emit(result, as_json, human)


def register(app: typer.Typer) -> None:
    """Add the ``keys`` group to ``app`` (``keys rotate`` comes from the repository commands)."""
    from edgepack.cli import _repo

    rotate = getattr(_repo, "register_keys_rotate", None)
    if rotate is not None:
        rotate(keys_app)
    from edgepack.cli import _envelopes

    _envelopes.register(keys_app)
    app.add_typer(keys_app)
