"""``edgepack pack``, ``edgepack verify`` and ``edgepack inspect``: bundles by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from edgepack._cli_output import JSON_OPTION, emit
from edgepack.cli._keys import (
    PASSPHRASE_ENV_OPTION,
    SIGN_CERT_OPTION,
    SIGN_CHAIN_OPTION,
    SIGN_KEY_OPTION,
    SIGSTORE_OPTION,
)
from edgepack.cli._progress import byte_progress
from edgepack.errors import InvalidInputError


def model_io(model_path: Path) -> dict[str, Any]:
    """Names, element types and shapes of an ONNX model's inputs and outputs.

    Uses the builder's reader when onnx is installed (the builder extra);
    otherwise onnxruntime, which every install has.
    """
    try:
        from edgepack.build.validate import model_io as read_io
    except ImportError:
        return _model_io_onnxruntime(model_path)
    try:
        inputs, outputs = read_io(model_path)
    except Exception as exc:
        raise InvalidInputError(f"{model_path} is not a readable ONNX model: {exc}") from None
    return {
        "path": model_path.name,
        "inputs": [i.as_dict() for i in inputs],
        "outputs": [o.as_dict() for o in outputs],
    }


def _model_io_onnxruntime(model_path: Path) -> dict[str, Any]:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise InvalidInputError(f"{model_path} is not a loadable ONNX model: {exc}") from None

    def describe(values: Any) -> list[dict[str, Any]]:
        return [{"name": v.name, "dtype": v.type, "shape": list(v.shape)} for v in values]

    return {
        "path": model_path.name,
        "inputs": describe(session.get_inputs()),
        "outputs": describe(session.get_outputs()),
    }


def pack_command(
    model_dir: Path = typer.Argument(
        ..., help="Directory holding model.onnx (and any external-data files)."
    ),
    name: str = typer.Option(..., "--name", help="Model name: lowercase letters, digits, dashes."),
    version: str = typer.Option(..., "--version", help="Release version, e.g. 1.2.0."),
    recipient: list[Path] = typer.Option(
        ...,
        "--recipient",
        metavar="PUB",
        help="X25519 public key allowed to decrypt, one key per file (repeatable).",
    ),
    sign_key: Path | None = SIGN_KEY_OPTION,
    sign_cert: Path | None = SIGN_CERT_OPTION,
    sign_chain: list[Path] = SIGN_CHAIN_OPTION,
    sigstore: bool = SIGSTORE_OPTION,
    output: Path = typer.Option(
        ..., "-o", "--output", metavar="OUTDIR", help="Directory to write the bundle into."
    ),
    hw: str | None = typer.Option(
        None,
        "--hw",
        metavar="PROFILE",
        help="Hardware profile the bundle is for (default: every device).",
    ),
    passphrase_env: str | None = PASSPHRASE_ENV_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Pack a model directory into one signed, encrypted bundle (NAME-VERSION-PROFILE.epk)."""
    from edgepack.bundle import pack
    from edgepack.bundle.writer import collect_payload
    from edgepack.keys import load_recipient_public_key
    from edgepack.signing import open_signer

    recipients = [load_recipient_public_key(p) for p in recipient]
    signer = open_signer(
        sign_key,
        certificate=sign_cert,
        chain=sign_chain,
        sigstore=sigstore,
        passphrase_env=passphrase_env,
    )
    architectures: list[str] = []
    if hw is not None:
        from edgepack.hw import load_profile

        architectures = [load_profile(hw).architecture]
    model_path = model_dir / "model.onnx"
    if not model_path.is_file():
        raise InvalidInputError(
            f"{model_dir} has no model.onnx", hint="pass the directory holding model.onnx"
        )
    info = model_io(model_path)
    total = sum(f.size for f in collect_payload(model_dir))
    with byte_progress("packing", total) as advance:
        result = pack(
            model_dir,
            output,
            name=name,
            version=version,
            recipients=recipients,
            signer=signer,
            profile=hw,
            architectures=architectures,
            model_info=info,
            progress=advance,
        )
    summary = {
        "path": str(result.path),
        "size": result.size,
        "payload_size": result.payload_size,
        "name": name,
        "version": version,
        "profile": hw,
        "recipients": len(recipients),
        "signer": signer.describe(),
    }
    emit(
        summary,
        as_json,
        lambda: typer.echo(
            f"wrote {result.path} ({result.size} bytes, {len(recipients)} recipient(s))"
        ),
    )


def verify_command(
    bundle: Path = typer.Argument(..., help="The bundle file."),
    trust: Path = typer.Option(
        ...,
        "--trust",
        metavar="POLICY",
        help="Trust policy file, or one producer public key (.pub).",
    ),
    recipient_key: Path | None = typer.Option(
        None,
        "--recipient-key",
        metavar="KEY",
        help="Also decrypt (in memory) and check every payload digest.",
    ),
    passphrase_env: str | None = PASSPHRASE_ENV_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Verify a bundle: structure, producer signature against a trust policy, and (with a key) the payload.

    Exit status 0 when it verifies, 4 when a check fails, 3 when the file is not a bundle.
    """
    from edgepack.bundle import read_info, verify
    from edgepack.keys import load_recipient_private_key
    from edgepack.signing import load_trust_policy

    policy = load_trust_policy(trust)
    key = load_recipient_private_key(recipient_key, passphrase_env) if recipient_key else None
    total = read_info(bundle).metadata["payload"]["size"] if key else 0
    with byte_progress("verifying", total) as advance:
        report = verify(bundle, policy, key, progress=advance)

    def human() -> None:
        what = (
            "signature and every payload digest"
            if report.decrypted
            else "signature (payload not decrypted: no --recipient-key)"
        )
        typer.echo(
            f"OK {report.info.name} {report.info.version}: {what} verified; signed by {report.signer}"
        )

    emit(report.summary(), as_json, human)


def inspect_command(
    bundle: Path = typer.Argument(..., help="The bundle file."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show a bundle's metadata (no key needed; nothing is verified)."""
    from edgepack.bundle import read_info

    info = read_info(bundle)
    summary = info.summary()

    def human() -> None:
        meta = info.metadata
        typer.echo(f"bundle      {info.path} ({info.size} bytes)")
        typer.echo(f"model       {info.name} {info.version}")
        typer.echo(f"profile     {info.profile or 'any'} ({', '.join(info.architectures)})")
        model = meta.get("model", {})
        for direction in ("inputs", "outputs"):
            for value in model.get(direction, []):
                typer.echo(
                    f"{direction[:-1]:<11} {value['name']}: {value['dtype']} {value['shape']}"
                )
        quant = meta.get("quantization") or {}
        typer.echo(f"quantised   {quant.get('recipe', 'none')}")
        typer.echo(f"payload     {len(info.manifest)} file(s), {meta['payload']['size']} bytes")
        for entry in info.manifest:
            typer.echo(f"  {entry.sha256[:16]}  {entry.size:>12}  {entry.path}")
        typer.echo(f"health set  {'yes' if meta.get('health') else 'none'}")
        _echo_monitoring(meta.get("monitoring"))
        typer.echo(f"recipients  {len(info.encryption.recipients)}")
        typer.echo(
            f"signature   {summary['signature'].get('kind')} {summary['signature'].get('key_id') or ''}".rstrip()
        )
        typer.echo(f"min agent   {meta['min_agent_version']}")

    emit(summary, as_json, human)


def _echo_monitoring(reference: dict[str, Any] | None) -> None:
    """The monitoring reference, briefly: per input its kind and feature count, per output
    its kind, the thresholds and the reference's size (its canonical JSON)."""
    if not reference:
        typer.echo("monitoring  none")
        return
    import json

    size = len(json.dumps(reference, sort_keys=True, separators=(",", ":")))
    typer.echo(f"monitoring  reference of {reference['rows']} rows, {size} bytes")
    for name, block in reference["inputs"].items():
        typer.echo(f"  input     {name}: {block['kind']}, {block['features']} feature(s)")
    for name, block in reference["outputs"].items():
        typer.echo(f"  output    {name}: {block['kind']}")
    limits = ", ".join(f"{k}={v:g}" for k, v in sorted(reference["thresholds"].items()))
    typer.echo(f"  thresholds {limits}")


def register(app: typer.Typer) -> None:
    """Add ``pack``, ``verify`` and ``inspect`` to ``app``."""
    app.command("pack")(pack_command)
    app.command("verify")(verify_command)
    app.command("inspect")(inspect_command)


__all__ = ["model_io", "register"]
