"""``make demo``: the whole loop on this machine, narrated.

Keys → build for an x86-64 and an aarch64 profile → TUF repository →
serve it and the fleet service (SQLite) on loopback → two devices enrol, are
registered, install, health-check, run the model and report → a broken v2 at a
partial rollout fails its health check on the one device it reaches, the
device's signed report shows it in ``edgepack fleet status``, and ``edgepack
fleet watch`` halts the rollout before it reaches the second device → v3 at a
50% rollout → an operator rollback returns the device to v1 from its cache →
the closing fleet table, from the fleet service's store.

Everything runs through the real commands (``edgepack``, ``edgepack-agent``)
as subprocesses, in a temporary directory removed at the end unless KEEP=1.
Nothing is left running.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel

from device_agent.outcome import describe_outcome

console = Console(width=None if sys.stdout.isatty() else 120)
PASSPHRASE = "demo-passphrase"
MODEL = "digits"
PROFILES = tuple(os.environ.get("EDGEPACK_DEMO_PROFILES", "intel-nuc,raspberry-pi-4").split(","))


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and why."""


class Demo:
    """State shared by the steps: the work directory, the environment, the devices."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.keys = root / "keys"
        self.repo = root / "repo"
        self.build = root / "build"
        self.env = dict(os.environ, EDGEPACK_PASSPHRASE=PASSPHRASE, EDGEPACK_DEBUG="0")
        self.devices: dict[str, dict[str, Any]] = {}
        self.server: subprocess.Popen[bytes] | None = None
        self.fleet: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.fleet_url = ""
        self.fleet_db = f"sqlite:///{root / 'fleet.db'}"
        self.step_no = 0

    # ------------------------------------------------------------------ helpers
    def step(self, title: str) -> None:
        """Print a step heading."""
        self.step_no += 1
        console.rule(f"[bold cyan]{self.step_no}. {title}")

    def run(
        self, program: str, *args: str, as_json: bool = True, ok: tuple[int, ...] = (0,)
    ) -> Any:
        """Run ``edgepack`` or ``edgepack-agent`` with ``args``; return parsed JSON output.

        ``ok`` lists the exit codes the step expects (a poll that refuses a bad
        release on verification exits 4 by design).
        """
        module = {"edgepack": "edgepack.cli", "edgepack-agent": "device_agent"}[program]
        argv = [sys.executable, "-m", module, *args] + (["--json"] if as_json else [])
        console.print(f"[dim]$ {program} {' '.join(self._short(a) for a in args)}[/dim]")
        proc = subprocess.run(
            argv, env=self.env, capture_output=True, text=True, check=False, timeout=600
        )
        if proc.returncode not in ok:
            raise DemoError(
                f"{program} {args[0]} failed ({proc.returncode}): {proc.stderr.strip()}"
            )
        if not as_json:
            return proc.stdout
        return json.loads(proc.stdout) if proc.stdout.strip() else None

    def _short(self, arg: str) -> str:
        return arg.replace(str(self.root), "$DEMO")


@contextmanager
def workdir() -> Iterator[Path]:
    """A temporary directory, kept when KEEP=1."""
    path = Path(tempfile.mkdtemp(prefix="edgepack-demo-"))
    try:
        yield path
    finally:
        if os.environ.get("KEEP") == "1":
            console.print(f"[yellow]KEEP=1: everything stays in {path}[/yellow]")
        else:
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------- steps
def generate_keys(demo: Demo) -> None:
    """Producer, model team, two devices; the repository's role keys come with ``repo init``."""
    demo.step("Generate keys: producer, model team, two devices")
    demo.keys.mkdir()
    demo.run("edgepack", "keys", "generate", "signing", "-o", str(demo.keys / "producer"))
    demo.run("edgepack", "keys", "generate", "signing", "-o", str(demo.keys / "team-digits"))
    for device in ("device-a", "device-b"):
        demo.run("edgepack", "keys", "generate", "recipient", "-o", str(demo.keys / device))
    console.print(
        "Private keys are 0600 and passphrase-protected ([dim]EDGEPACK_PASSPHRASE[/dim])."
    )


def train() -> tuple[Any, Any, Any, Any]:
    """A small MLP on scikit-learn's bundled digits; no download."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.25, random_state=0
    )
    # tol 1e-3 converges (131 epochs, 97 % test accuracy), so no ConvergenceWarning.
    model = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, tol=1e-3, random_state=0)
    model.fit(x_train, y_train)
    return model, x_test, y_test, digits


def build_release(demo: Demo, model: Any, version: str, x_val: Any, y_val: Any) -> list[Path]:
    """``edgepack.build`` for the two profiles with ``auto`` quantisation."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from edgepack.build.api import build
    from edgepack.keys import load_recipient_public_key, load_signing_key

    os.environ["EDGEPACK_PASSPHRASE"] = PASSPHRASE
    recipients = [
        load_recipient_public_key(demo.keys / f"{d}.pub") for d in ("device-a", "device-b")
    ]
    signer = load_signing_key(demo.keys / "producer.key")
    out = demo.build / version
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(f"building {MODEL} {version}", total=None)
        result = build(
            model,
            name=MODEL,
            version=version,
            hw=list(PROFILES),
            out_dir=out,
            recipients=recipients,
            signer=signer,
            quantize=os.environ.get("EDGEPACK_DEMO_QUANTIZE", "auto"),
            max_accuracy_drop=0.01,
            validation=x_val[:200],
            calibration=x_val[:100],
            labels=y_val[:200],
            progress=lambda message: bar.update(task, description=f"{MODEL} {version}: {message}"),
        )
    from edgepack.build.report import render

    render(result.report, console)
    return result.bundles


def init_repository(demo: Demo, bundles: Sequence[Path]) -> None:
    """Repository with separate role keys; delegate the model to its team; publish; promote."""
    demo.step("Init the TUF repository, add the model, publish v1, promote to stable")
    demo.run("edgepack", "repo", "init", str(demo.repo))
    demo.run(
        "edgepack",
        "repo",
        "add-model",
        str(demo.repo),
        MODEL,
        "--key",
        str(demo.keys / "team-digits.pub"),
    )
    publish(demo, bundles)
    demo.run("edgepack", "promote", MODEL, "1.0.0", "--repo", str(demo.repo), "--channel", "stable")


def publish(demo: Demo, bundles: Sequence[Path]) -> None:
    """Publish bundles under the model team's delegated role."""
    demo.run(
        "edgepack",
        "publish",
        *map(str, bundles),
        "--repo",
        str(demo.repo),
        "--key",
        str(demo.keys / "team-digits.key"),
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, what: str) -> None:
    import socket

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise DemoError(f"the {what} did not start")


def serve(demo: Demo) -> None:
    """``edgepack repo serve`` on a free loopback port, in the background."""
    demo.step("Serve the repository on loopback")
    port = _free_port()
    demo.server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgepack.cli",
            "repo",
            "serve",
            str(demo.repo),
            "--port",
            str(port),
        ],
        env=demo.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    demo.url = f"http://127.0.0.1:{port}"
    _wait_listening(port, "repository server")
    console.print(f"serving {demo.repo / 'public'} at {demo.url}/ (metadata/, targets/)")


def serve_fleet(demo: Demo) -> None:
    """``edgepack fleet serve`` with SQLite on a free loopback port, in the background."""
    demo.step("Start the fleet service (SQLite) on loopback")
    token = demo.keys / "fleet-operator.token"
    demo.run("edgepack", "fleet", "token", "--out", str(token), as_json=False)
    port = _free_port()
    demo.fleet = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgepack.cli",
            "fleet",
            "serve",
            "--db",
            demo.fleet_db,
            "--port",
            str(port),
            "--token-file",
            str(token),
        ],
        env=demo.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    demo.fleet_url = f"http://127.0.0.1:{port}"
    _wait_listening(port, "fleet service")
    console.print(
        f"fleet service at {demo.fleet_url}/ (store {demo.fleet_db}); the dashboard and the "
        "operator API need the token in $DEMO/keys/fleet-operator.token"
    )


def enroll(demo: Demo) -> None:
    """Two devices, one per profile, each in its own data directory."""
    root = demo.repo / "public" / "metadata" / "1.root.json"
    for device, profile in zip(("device-a", "device-b"), PROFILES, strict=True):
        data = demo.root / device
        result = demo.run(
            "edgepack-agent",
            "enroll",
            "--repo-url",
            demo.url,
            "--root",
            str(root),
            "--data-dir",
            str(data),
            "--model",
            MODEL,
            "--channel",
            "stable",
            "--profile",
            profile,
            "--trust",
            str(demo.keys / "producer.pub"),
            "--recipient-key",
            str(demo.keys / f"{device}.key"),
            "--fleet-url",
            demo.fleet_url,
        )
        demo.devices[device] = {"data": data, "profile": profile, "id": result["device_id"]}
        console.print(f"{device}: id {result['device_id']}, profile {profile}")
        # The operator's consent: a device never registers itself.
        demo.run("edgepack", "fleet", "register", str(result["record"]), "--db", demo.fleet_db)
    console.print(
        "[dim]device-b is enrolled with an explicit aarch64 profile, so it selects and verifies the aarch64 "
        "variant; on this x86-64 host its model runs on the x86 CPU. The real agent on emulated aarch64 is "
        "tested in tests/hw/test_emulation_agent.py.[/dim]"
    )


def poll(demo: Demo, device: str) -> list[dict[str, Any]]:
    """One ``edgepack-agent run --once``, then its signed report to the fleet service;
    returns the per-model outcomes."""
    start = time.perf_counter()
    outcomes = demo.run(
        "edgepack-agent",
        "run",
        "--once",
        "--data-dir",
        str(demo.devices[device]["data"]),
        ok=(0, 4),
    )
    elapsed = time.perf_counter() - start
    for outcome in outcomes or []:
        style = "red" if outcome.get("error") else "default"
        line = describe_outcome(outcome)
        # One line per outcome (a terminal may fold it; rich must not cut it in two).
        console.print(
            f"  {device}: [{style}]{escape(line)}[/{style}] ({elapsed:.2f} s)", soft_wrap=True
        )
    demo.run("edgepack-agent", "report", "--data-dir", str(demo.devices[device]["data"]))
    return list(outcomes or [])


def running(demo: Demo, device: str) -> str:
    """The version a device runs now, from ``edgepack-agent status --json``."""
    status = demo.run("edgepack-agent", "status", "--data-dir", str(demo.devices[device]["data"]))
    models = status.get("models", {}) if isinstance(status, dict) else {}
    entry = models.get(MODEL, {}) if isinstance(models, dict) else {}
    return str(entry.get("version") or entry.get("running") or entry.get("revision") or "-")


def infer(demo: Demo, device: str, image: Any, label: int) -> None:
    """Run the active model on a real digit, through the device API."""
    import numpy as np

    from device_agent import open_session

    session = open_session(MODEL, data_dir=demo.devices[device]["data"])
    outputs = session.run(
        None, {session.get_inputs()[0].name: image.reshape(1, -1).astype(np.float32)}
    )
    predicted = int(np.asarray(outputs[0]).reshape(-1)[0])
    art = "\n".join(
        "".join(" .:-=+*#%@"[min(9, int(v * 9.99))] * 2 for v in row) for row in image.reshape(8, 8)
    )
    console.print(Panel(art, title=f"{device}: predicted {predicted}, true {label}", expand=False))


def broken_release(demo: Demo, v1: Sequence[Path]) -> list[Path]:
    """v2: v1's model with corrupted weights but v1's golden health set, signed by the producer.

    It passes every signature check: only the health check on the device,
    which replays the recorded golden inputs, can see that its outputs are wrong.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from edgepack.bundle import pack, read_info, unpack
    from edgepack.keys import (
        load_recipient_private_key,
        load_recipient_public_key,
        load_signing_key,
    )
    from edgepack.signing import load_trust_policy

    key = load_recipient_private_key(demo.keys / "device-a.key")
    policy = load_trust_policy(demo.keys / "producer.pub")
    recipients = [
        load_recipient_public_key(demo.keys / f"{d}.pub") for d in ("device-a", "device-b")
    ]
    out: list[Path] = []
    for bundle in v1:
        info = read_info(bundle)
        staging = demo.build / "broken" / (info.profile or "any")
        staging.parent.mkdir(parents=True, exist_ok=True)
        unpack(bundle, staging, recipient_key=key, policy=policy)
        model_path = staging / info.metadata["model"]["path"]
        model_path.chmod(0o644)
        proto = onnx.load(str(model_path))
        for init in proto.graph.initializer:
            array = numpy_helper.to_array(init)
            # Weight matrices, whether fp32 or already quantised to int8: rolled columns, wrong outputs.
            if array.ndim == 2 and array.dtype in (np.float32, np.int8, np.uint8):
                init.CopyFrom(numpy_helper.from_array(np.roll(array, 1, axis=-1), init.name))
        model_path.unlink()
        onnx.save(proto, str(model_path))
        meta = info.metadata
        result = pack(
            staging,
            demo.build / "2.0.0",
            name=MODEL,
            version="2.0.0",
            recipients=recipients,
            signer=load_signing_key(demo.keys / "producer.key"),
            profile=info.profile,
            architectures=info.architectures,
            model_info=meta["model"],
            quantization=meta.get("quantization"),
            provenance=meta.get("provenance"),
            health=meta.get("health"),
        )
        out.append(result.path)
    return out


def fleet_status(demo: Demo) -> dict[str, Any]:
    """``edgepack fleet status --json`` from the fleet service's store."""
    status = demo.run("edgepack", "fleet", "status", "--db", demo.fleet_db, ok=(0, 4))
    return status if isinstance(status, dict) else {}


def show_releases(demo: Demo, status: dict[str, Any]) -> None:
    """The per-release rows of ``fleet status``: who runs it, who failed it and why."""
    from rich.table import Table

    table = Table(title="releases, as the devices report them")
    for column in ("release", "running", "failed (why)", "failure rate"):
        table.add_column(column)
    for r in status.get("releases", []):
        failed = ", ".join(f"{n} ({why})" for why, n in (r.get("failed") or {}).items()) or "0"
        rate = r.get("failure_rate")
        table.add_row(
            f"{r['model']} {r['version']} on {r['channel']}",
            str(r.get("running", 0)),
            failed,
            "-" if rate is None else f"{rate:.0%}",
        )
    console.print(table)


def summary(demo: Demo) -> None:
    """The fleet now, from ``edgepack fleet status`` (the devices' signed reports)."""
    from rich.table import Table

    status = fleet_status(demo)
    by_id = {d["device_id"]: d for d in status.get("devices", [])}
    table = Table(title="the fleet now (edgepack fleet status)")
    for column in ("device", "profile", "running", "last report", "refused"):
        table.add_column(column)
    for device, facts in demo.devices.items():
        entry = by_id.get(facts["id"], {})
        model = (entry.get("models") or {}).get(MODEL, {})
        seen = entry.get("last_seen")
        refused = ", ".join(sorted(model.get("refused") or {})) or "-"
        table.add_row(
            device,
            str(facts["profile"]),
            str(model.get("version") or "-"),
            "never" if not seen else f"{max(0.0, time.time() - float(seen)):.0f} s ago",
            refused,
        )
    console.print(table)
    if not by_id:
        raise DemoError("edgepack fleet status lists no device: the reports did not arrive")


def split_rollout(demo: Demo, version: str) -> int:
    """50%, or — with only two devices — the nearest percentage that puts exactly one of them in."""
    from edgepack.channel import rollout_bucket

    buckets = {d: rollout_bucket(MODEL, version, v["id"]) for d, v in demo.devices.items()}
    inside = [d for d, b in buckets.items() if b < 50]
    if len(inside) == 1:
        return 50
    low, high = sorted(buckets.values())
    percent = int(low) + 1
    console.print(
        f"[yellow]With two devices a 50% rollout may take both or none (buckets "
        f"{', '.join(f'{d}={b:.1f}' for d, b in buckets.items())}); using {percent}% so exactly one is in.[/yellow]"
    )
    assert low < percent <= high
    return percent


def in_rollout(demo: Demo, version: str, percent: float) -> tuple[str, str]:
    """(the device inside a ``percent`` rollout of ``version``, the one outside)."""
    from edgepack.channel import rollout_bucket

    ordered = sorted(
        demo.devices, key=lambda d: rollout_bucket(MODEL, version, demo.devices[d]["id"])
    )
    first, second = ordered[0], ordered[-1]
    assert rollout_bucket(MODEL, version, demo.devices[first]["id"]) < percent
    return first, second


def main() -> int:
    """Run the demo; exit 0 when every step did what it says."""
    started = time.perf_counter()
    console.print(
        Panel.fit(
            "edgepack demo: build → sign → encrypt → publish (TUF) → install → roll back",
            style="bold",
        )
    )
    with workdir() as root:
        demo = Demo(root)
        try:
            generate_keys(demo)
            demo.step(
                "Train a digits MLP and build it for intel-nuc (x86-64) and raspberry-pi-4 (aarch64)"
            )
            model, x_test, y_test, _digits = train()
            v1 = build_release(demo, model, "1.0.0", x_test, y_test)
            init_repository(demo, v1)
            serve(demo)
            serve_fleet(demo)
            demo.step("Enroll two devices and run their agents")
            enroll(demo)
            for device in demo.devices:
                poll(demo, device)
            for device in demo.devices:
                infer(demo, device, x_test[0], int(y_test[0]))

            demo.step(
                "Publish a broken v2 (wrong outputs, validly signed) at a watched partial rollout"
            )
            v2 = broken_release(demo, v1)
            publish(demo, v2)
            percent = split_rollout(demo, "2.0.0")
            demo.run(
                "edgepack",
                "promote",
                MODEL,
                "2.0.0",
                "--repo",
                str(demo.repo),
                "--channel",
                "stable",
                "--rollout",
                str(percent),
                "--halt-on-failure",
                "50%",
                "--min-devices",
                "1",
                "--widen",
                "100",
                "--widen-after",
                "1s",
            )
            first, second = in_rollout(demo, "2.0.0", percent)
            poll(demo, first)
            console.print(
                f"  {first} runs {running(demo, first)}: the health check refused v2, v1 kept"
            )
            show_releases(demo, fleet_status(demo))
            watched = demo.run(
                "edgepack",
                "fleet",
                "watch",
                "--db",
                demo.fleet_db,
                "--repo",
                str(demo.repo),
                "--once",
            )
            decisions = watched.get("decisions", []) if isinstance(watched, dict) else []
            for d in decisions:
                console.print(
                    f"  fleet watch: {d['action']} {d['model']} {d['version']}: {d['reason']}"
                )
            if not any(d.get("action") == "halt" for d in decisions):
                raise DemoError("fleet watch did not halt the failing rollout")
            console.print(
                "  [dim]healthy, the policy would have widened v2 to 100% on this step; halted, "
                "it stays where it was[/dim]"
            )
            poll(demo, second)
            console.print(
                f"  {second} runs {running(demo, second)}: the halted rollout never reached it"
            )
            demo.run("edgepack", "revoke", MODEL, "2.0.0", "--repo", str(demo.repo))

            demo.step("Publish a good v3 at a partial rollout, then roll back")
            retrained, _, _, _ = train()
            v3 = build_release(demo, retrained, "3.0.0", x_test, y_test)
            publish(demo, v3)
            percent = split_rollout(demo, "3.0.0")
            demo.run(
                "edgepack",
                "promote",
                MODEL,
                "3.0.0",
                "--repo",
                str(demo.repo),
                "--channel",
                "stable",
                "--rollout",
                str(percent),
            )
            for device in demo.devices:
                poll(demo, device)
                console.print(f"  {device} runs {running(demo, device)}")
            start = time.perf_counter()
            demo.run(
                "edgepack",
                "rollback",
                MODEL,
                "--repo",
                str(demo.repo),
                "--channel",
                "stable",
                "--to",
                "1.0.0",
            )
            published = time.perf_counter() - start
            for device in demo.devices:
                poll(demo, device)
                console.print(f"  {device} runs {running(demo, device)}")
            console.print(
                f"rollback published in {published:.2f} s; devices switched on their next poll, from cache"
            )

            summary(demo)

            demo.step("Where everything lives, and what to try next")
            console.print(
                f"repository work tree: {demo.repo} (keys/ private, public/ served)\n"
                f"bundles: {demo.build}\n"
                f"devices: {', '.join(str(v['data']) for v in demo.devices.values())}\n"
                f"fleet store: {demo.fleet_db}\n"
                "try: edgepack inspect BUNDLE · edgepack repo status REPO · edgepack-agent status --data-dir DIR"
                " · edgepack fleet status --db URL\n"
                "docs: docs/bundle-format.md, docs/repository.md, docs/agent.md, docs/fleet.md, docs/threat-model.md"
            )
        except DemoError as exc:
            console.print(f"[bold red]demo failed:[/bold red] {exc}")
            return 1
        finally:
            for server in (demo.server, demo.fleet):
                if server is not None:
                    server.terminate()
                    server.wait(timeout=10)
    console.print(
        f"[bold green]demo finished in {time.perf_counter() - started:.0f} s[/bold green]"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
