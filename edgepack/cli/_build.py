"""``edgepack build``: a trained model in, one verified bundle per hardware profile out.

The builder (onnx, onnxruntime's quantisation tools, skl2onnx, torch) is
imported only when the command runs, so the rest of the CLI starts fast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from edgepack._cli_output import JSON_OPTION, emit
from edgepack.cli._keys import (
    PASSPHRASE_ENV_OPTION,
    SIGN_CERT_OPTION,
    SIGN_CHAIN_OPTION,
    SIGN_KEY_OPTION,
    SIGSTORE_OPTION,
)
from edgepack.errors import InvalidInputError

RECIPE_HELP = "none | fp16 | dynamic | static | auto (default: the profile's recipe)."


# The packages of the ``builder`` extra: a device's base install has none of them.
_BUILDER_PACKAGES = frozenset({"onnx", "skl2onnx", "sklearn"})


@contextmanager
def _builder_extras() -> Iterator[None]:
    """Turn a missing builder package into one line saying which extra to install."""
    try:
        yield
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in _BUILDER_PACKAGES:
            raise
        raise InvalidInputError(
            "edgepack build needs the builder extras: pip install 'edgepack[builder]'"
        ) from None


@contextmanager
def _steps() -> Iterator[Callable[[str], None]]:
    """A live progress line on stderr for the long steps (only when a person is watching)."""
    if not sys.stderr.isatty():
        yield lambda _step: None
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task("building", total=None)
        yield lambda step: progress.update(task, description=step)


def build_command(
    model: Path = typer.Argument(
        ...,
        help="The model: .onnx (+ external data), .pt2, or a pickle/joblib with --allow-pickle.",
    ),
    name: str = typer.Option(..., "--name", help="Model name: lowercase letters, digits, dashes."),
    version: str = typer.Option(..., "--version", help="Release version, e.g. 1.2.0."),
    hw: list[str] = typer.Option(
        ..., "--hw", metavar="PROFILE", help="Hardware profile to build for (repeatable)."
    ),
    quantize: str | None = typer.Option(None, "--quantize", metavar="RECIPE", help=RECIPE_HELP),
    min_cosine: float | None = typer.Option(
        None, "--min-cosine", metavar="X", help="Quality target: mean cosine to fp32 at least X."
    ),
    max_accuracy_drop: float | None = typer.Option(
        None,
        "--max-accuracy-drop",
        metavar="X",
        help="Quality target: accuracy lost at most X (0.01 = one point; needs labels or a classifier).",
    ),
    calibration: Path | None = typer.Option(
        None, "--calibration", metavar="DATA", help="Calibration samples: .npy/.npz or a directory."
    ),
    validation: Path | None = typer.Option(
        None, "--validation", metavar="DATA", help="Validation samples: .npy/.npz or a directory."
    ),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Allow pickle/joblib model files (they can run code)."
    ),
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
    passphrase_env: str | None = PASSPHRASE_ENV_OPTION,
    monitor_threshold: list[str] = typer.Option(
        [],
        "--monitor-threshold",
        metavar="KEY=VALUE",
        help="Override a default monitoring threshold in the bundle, e.g. drift_psi=0.3 (repeatable).",
    ),
    no_monitoring: bool = typer.Option(
        False, "--no-monitoring", help="Record no monitoring reference in the bundles."
    ),
    output: Path = typer.Option(
        ..., "-o", "--output", metavar="OUTDIR", help="Directory to write the bundles into."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Convert, quantise and validate a model per hardware profile, then pack signed bundles."""
    with _builder_extras():
        from edgepack.build import build
        from edgepack.build.api import parse_thresholds
        from edgepack.build.convert import PICKLE_RISK, PICKLE_SUFFIXES
    thresholds = parse_thresholds(monitor_threshold)
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
    if allow_pickle and model.suffix.lower() in PICKLE_SUFFIXES:
        typer.echo(f"edgepack: warning: {PICKLE_RISK}", err=True)
    with _steps() as step, _builder_extras():
        result = build(
            model,
            name=name,
            version=version,
            hw=hw,
            out_dir=output,
            recipients=recipients,
            signer=signer,
            quantize=quantize,
            min_cosine=min_cosine,
            max_accuracy_drop=max_accuracy_drop,
            calibration=calibration,
            validation=validation,
            allow_pickle=allow_pickle,
            progress=step,
            monitoring=not no_monitoring,
            monitor_thresholds=thresholds,
        )
    data = result.report.as_dict()
    data["bundles"] = [str(p) for p in result.bundles]
    data["report_file"] = str(result.report_path)

    def human() -> None:
        from rich.console import Console

        from edgepack.build.report import render

        # A pipe or a file gets a wide table rather than rich's 80-column default.
        console = Console(width=None if sys.stdout.isatty() else 160)
        render(result.report, console)
        for path in result.bundles:
            console.print(f"wrote {path}", markup=False)
        console.print(f"report: {result.report_path}", markup=False)

    emit(data, as_json, human)


def register(app: typer.Typer) -> None:
    """Add ``build`` to ``app``."""
    app.command("build")(build_command)


__all__ = ["register"]
