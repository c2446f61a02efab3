"""Repository scale: publish time and the metadata bytes devices download.

    .venv/bin/python benchmarks/bench_repo.py [--sizes 10,1000,10000] [--repeat 3] [--dir DIR]

For each size N, a repository gets one model with N releases. Filling it uses
the batch path (``publish`` of many bundles in one call, each a small file
described through the ``reader`` hook rather than a packed bundle, so the
benchmark measures the repository and not ``pack``). Then, at N:

* ``publish_s``: the median time of --repeat single publishes of one *real*
  packed bundle (read, hash, copy, sign the model's role or bin, snapshot,
  timestamp), the operation whose growth we care about;
* ``fresh_*``: what a device with only root v1 downloads to find the stable
  channel document and the newest bundle's target info (metadata bytes and
  requests), with python-tuf's ngclient over HTTP on 127.0.0.1;
* ``poll_*``: what the same device downloads when it polls again with nothing
  new (a root probe answered 404, then ``timestamp.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuf.ngclient.updater import Updater
from tuf.ngclient.urllib3_fetcher import Urllib3Fetcher

from edgepack import repo
from edgepack.bundle.metadata import PayloadFile

MODEL = "digits"


@dataclass(frozen=True)
class FakeInfo:
    """A release for the batch fill: what ``read_info`` would say about a bundle."""

    path: Path
    name: str
    version: str
    profile: str | None
    architectures: tuple[str, ...]
    manifest: tuple[PayloadFile, ...] = ()


class CountingFetcher(Urllib3Fetcher):
    """ngclient's own fetcher, counting the bytes and requests it makes."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.requests: list[str] = []

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.requests.append(url.rsplit("/", 1)[-1])
        for chunk in super()._fetch(url):
            self.bytes += len(chunk)
            yield chunk


def _fill(workdir: Path, key: Path, start: int, count: int, scratch: Path) -> float:
    """Publish ``count`` small releases in batches; return seconds spent."""
    infos: dict[Path, FakeInfo] = {}
    batch = 1000
    elapsed = 0.0
    for first in range(start, start + count, batch):
        paths = []
        for i in range(first, min(first + batch, start + count)):
            path = scratch / f"r{i}.epk"
            path.write_bytes(os.urandom(256))
            infos[path] = FakeInfo(path, MODEL, f"0.{i}.0", None, ("aarch64",))
            paths.append(path)
        t = time.perf_counter()
        repo.publish(
            workdir,
            paths,
            key=str(key),
            passphrase=repo.no_passphrase,
            reader=lambda p: infos[p],
        )
        elapsed += time.perf_counter() - t
        for path in paths:
            path.unlink()
    return elapsed


def _device(url: str, home: Path, root: bytes) -> tuple[Updater, CountingFetcher]:
    (home / "metadata").mkdir(parents=True, exist_ok=True)
    if not (home / "metadata/root.json").exists():
        (home / "metadata/root.json").write_bytes(root)
    fetcher = CountingFetcher()
    updater = Updater(
        str(home / "metadata"),
        f"{url}/metadata/",
        str(home),
        f"{url}/targets/",
        fetcher=fetcher,
        bootstrap=None,
    )
    return updater, fetcher


def measure(size: int, repeat: int, base: Path) -> dict[str, Any]:
    """Build a repository with ``size`` releases and measure it."""
    from edgepack.bundle import pack
    from edgepack.keys import generate_recipient_key, generate_signing_key, write_keypair
    from edgepack.signing import ProducerKeySigner

    workdir = base / f"repo-{size}"
    repo.init(workdir, passphrase=None)
    team = write_keypair(base / f"team-{size}", generate_signing_key())
    repo.add_model(workdir, MODEL, team.public, passphrase=repo.no_passphrase)
    scratch = base / f"scratch-{size}"
    scratch.mkdir()
    fill_count = size - repeat
    fill_s = _fill(workdir, team.private, 0, fill_count, scratch)

    producer, fleet = ProducerKeySigner(generate_signing_key()), generate_recipient_key()
    times = []
    last = ""
    for i in range(repeat):
        model_dir = scratch / f"m{i}"
        model_dir.mkdir()
        (model_dir / "model.onnx").write_bytes(os.urandom(4096))
        last = f"1.{i}.0"
        bundle = pack(
            model_dir,
            scratch,
            name=MODEL,
            version=last,
            recipients=[fleet.public_key()],
            signer=producer,
        ).path
        t = time.perf_counter()
        repo.publish(workdir, [bundle], key=str(team.private), passphrase=repo.no_passphrase)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    repo.promote(workdir, MODEL, last, channel="stable", passphrase=repo.no_passphrase)
    promote_s = time.perf_counter() - t

    server = repo.make_server(workdir, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    root = (workdir / "public/metadata/1.root.json").read_bytes()
    try:
        device, fetcher = _device(url, base / f"device-{size}", root)
        doc = device.get_targetinfo(f"channels/{MODEL}/stable.json")
        bundle_info = device.get_targetinfo(f"models/{MODEL}/{MODEL}-{last}-any.epk")
        assert doc is not None and bundle_info is not None
        fresh = (fetcher.bytes, list(fetcher.requests))
        device, fetcher = _device(url, base / f"device-{size}", root)
        device.refresh()
        poll = (fetcher.bytes, list(fetcher.requests))
    finally:
        server.shutdown()
        server.server_close()
    status = repo.open_status(workdir)
    meta_dir = workdir / "public/metadata"
    snapshot_size = max((p.stat().st_size for p in meta_dir.glob("*.snapshot.json")), default=0)
    return {
        "releases": size,
        "bins": status["models"][0]["bins"],
        "fill_s": round(fill_s, 2),
        "fill_per_release_ms": round(1000 * fill_s / max(1, fill_count), 2),
        "publish_s": round(statistics.median(times), 4),
        "promote_s": round(promote_s, 4),
        "fresh_metadata_bytes": fresh[0],
        "fresh_requests": fresh[1],
        "poll_bytes": poll[0],
        "poll_requests": poll[1],
        "snapshot_bytes": snapshot_size,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,1000,10000")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        rows = [measure(int(s), args.repeat, Path(tmp)) for s in args.sizes.split(",")]
    print(json.dumps(rows, indent=2))
    print()
    print(
        "| releases | bins | publish one (s) | batch fill per release (ms) | promote (s) "
        "| fresh device metadata (bytes, requests) | no-change poll (bytes, requests) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['releases']:,} | {r['bins']} | {r['publish_s']:.3f} | "
            f"{r['fill_per_release_ms']:.2f} | {r['promote_s']:.3f} | "
            f"{r['fresh_metadata_bytes']:,}, {len(r['fresh_requests'])} | "
            f"{r['poll_bytes']:,}, {len(r['poll_requests'])} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
