"""``edgepack keys …``: producer signing keys and recipient (device or fleet) keys."""

from __future__ import annotations

import enum
from pathlib import Path

import typer

from edgepack._cli_output import JSON_OPTION, emit
from edgepack.keys import (
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
    help="Read the passphrase from this environment variable (default: EDGEPACK_PASSPHRASE, else a prompt).",
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
    as_json: bool = JSON_OPTION,
) -> None:
    """Generate a key pair: PATH.key (private, 0600, passphrase-protected when one is given) and PATH.pub.

    The passphrase comes from $EDGEPACK_PASSPHRASE (or the variable --passphrase-env
    names), else from a prompt; with neither and no terminal the key is written
    unencrypted.
    """
    passphrase = resolve_passphrase(
        passphrase_env, purpose=f"the new {kind.value} key", required=False, confirm=True
    )
    key = generate_signing_key() if kind is KeyKindChoice.signing else generate_recipient_key()
    paths = write_keypair(output, key, passphrase)
    result = {
        "kind": kind.value,
        "private_key": str(paths.private),
        "public_key": str(paths.public),
        "encrypted": passphrase is not None,
    }

    def human() -> None:
        typer.echo(
            f"wrote {paths.private} (private, mode 0600{', encrypted' if passphrase else ''})"
        )
        typer.echo(f"wrote {paths.public} (public)")

    emit(result, as_json, human)


def register(app: typer.Typer) -> None:
    """Add the ``keys`` group to ``app`` (``keys rotate`` comes from the repository commands)."""
    from edgepack.cli import _repo

    rotate = getattr(_repo, "register_keys_rotate", None)
    if rotate is not None:
        rotate(keys_app)
    app.add_typer(keys_app)
