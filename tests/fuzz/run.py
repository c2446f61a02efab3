"""Run the fuzz harnesses: ``python -m tests.fuzz.run [--seconds N] [TARGET ...]``.

Each target gets a scratch directory ``OUT/TARGET/`` (``.fuzz/`` by default,
never committed): ``corpus/`` seeded from ``tests/fuzz/corpus/TARGET/`` and
from the golden files, ``artifacts/`` for crash reproducers, and ``fuzz.log``.
Targets run one after another, one fuzzer process at a time.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.fuzz._common import MACHINE_FILES, MACHINE_SEPARATOR, SCRATCH_ENV

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "tests" / "fuzz"
TARGETS = ("bundle_container", "bundle_metadata", "channel", "config", "journal", "hw")
GOLDEN_BUNDLE = ROOT / "tests" / "golden" / "v1" / "golden-1.0.0-generic-x86_64.epk"
# libFuzzer's guards: an input taking longer than this many seconds is a hang, a
# process growing past this many MiB a memory blow-up; both count as findings.
TIMEOUT_S = 10
# Tokens the mutator splices in: the grammar of each target's format (tests/fuzz/dicts/).
DICTS = {
    "bundle_container": "json",
    "bundle_metadata": "json",
    "channel": "json",
    "config": "toml",
    "journal": "json",
    "hw": "toml",
}
RSS_LIMIT_MB = 1024


def _golden_members() -> dict[str, bytes]:
    from edgepack.bundle import _container
    from edgepack.bundle.metadata import MEMBER_ORDER

    data = GOLDEN_BUNDLE.read_bytes()
    members = _container.read_members(io.BytesIO(data), len(data), MEMBER_ORDER, {})
    return {m.name: data[m.offset : m.offset + m.size] for m in members}


def _generated_seeds(target: str) -> dict[str, bytes]:
    """Seeds made at run time from files the repository already holds."""
    if target == "bundle_container":
        return {"golden.epk": GOLDEN_BUNDLE.read_bytes()}
    if target == "bundle_metadata":
        members = _golden_members()
        return {
            "golden-bundle.json": b"\x00" + members["meta/bundle.json"],
            "golden-encryption.json": b"\x01" + members["meta/encryption.json"],
        }
    if target == "hw":
        seeds = {
            f"profile-{p.stem}": b"\x00" + p.read_bytes()
            for p in sorted((ROOT / "hw" / "profiles").glob("*.toml"))
        }
        for fixture in sorted((ROOT / "tests" / "hw" / "fixtures").iterdir()):
            parts = [
                (fixture / name).read_bytes() if (fixture / name).is_file() else b""
                for name in MACHINE_FILES
            ]
            seeds[f"machine-{fixture.name}"] = b"\x01" + MACHINE_SEPARATOR.join(parts)
        return seeds
    return {}


def prepare(target: str, out: Path) -> Path:
    """Create ``out/TARGET/corpus`` holding the committed and the generated seeds."""
    corpus = out / target / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    committed = HERE / "corpus" / target
    if committed.is_dir():
        for seed in committed.iterdir():
            shutil.copyfile(seed, corpus / seed.name)
    for name, data in _generated_seeds(target).items():
        (corpus / name).write_bytes(data)
    (out / target / "artifacts").mkdir(exist_ok=True)
    (out / target / "scratch").mkdir(exist_ok=True)
    return corpus


def environment(target: str, out: Path) -> dict[str, str]:
    """The harness's environment: its scratch files go to ``out/TARGET/scratch``."""
    return {**os.environ, SCRATCH_ENV: str(out / target / "scratch")}


def command(target: str, out: Path, *flags: str) -> list[str]:
    """The libFuzzer command line for ``target`` over its scratch corpus."""
    return [
        sys.executable,
        "-m",
        f"tests.fuzz.fuzz_{target}",
        f"-timeout={TIMEOUT_S}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        f"-artifact_prefix={out / target / 'artifacts'}/",
        "-print_final_stats=1",
        f"-dict={HERE / 'dicts' / (DICTS[target] + '.dict')}",
        *flags,
        str(out / target / "corpus"),
    ]


def run(target: str, out: Path, *flags: str) -> int:
    """Fuzz ``target`` with ``flags``; the log goes to ``out/TARGET/fuzz.log``."""
    prepare(target, out)
    log = out / target / "fuzz.log"
    with open(log, "wb") as handle:
        return subprocess.run(
            command(target, out, *flags),
            cwd=ROOT,
            env=environment(target, out),
            stdout=handle,
            stderr=subprocess.STDOUT,
            check=False,
        ).returncode


def main(argv: list[str] | None = None) -> int:
    """Fuzz the named targets (all by default) one after another; non-zero if any crashed."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=600, help="per target (default 600)")
    parser.add_argument("--out", type=Path, default=ROOT / ".fuzz", help="scratch directory")
    parser.add_argument("targets", nargs="*", help=f"some of {', '.join(TARGETS)} (default all)")
    args = parser.parse_args(argv)
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown target(s) {', '.join(sorted(unknown))}")
    failed: list[str] = []
    for target in args.targets or TARGETS:
        print(f"fuzzing {target} for {args.seconds} s (log: {args.out / target / 'fuzz.log'})")
        code = run(target, args.out, f"-max_total_time={args.seconds}")
        if code != 0:
            print(f"  {target}: exit {code}, see the log and {args.out / target / 'artifacts'}")
            failed.append(target)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
