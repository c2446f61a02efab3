"""Per-device key envelopes at fleet scale: publish time, bytes, and a device's poll.

    .venv/bin/python benchmarks/bench_envelopes.py [--sizes 10000,100000] [--repeat 3] [--dir DIR]

For each fleet size N (X25519 device keys made in-process; no enrolment), a
repository gets one model with two small real releases, then:

* ``wrap_s``: ``edgepack keys wrap``'s library call (``_envelopes.wrap``) for release
  1 and all N devices, median of --repeat fresh repositories; ``metadata_bytes``: the
  bytes of every metadata file that call wrote (targets, envelopes role, every bin,
  snapshot, timestamp), ``envelope_bytes`` the N envelope files;
* ``add_one_s``: wrapping release 1 for one more device afterwards (loads every bin);
* ``second_wrap_s``: release 2 for all N devices (2N envelopes in the role);
* ``fresh_*``: what a device with only root v1 downloads to find and fetch its
  release-1 envelope (python-tuf's ngclient over HTTP on 127.0.0.1);
* ``uptodate_*``: what that device downloads for its release-2 envelope once
  release 2 is wrapped (it has the metadata of before);
* ``idle_*``: its next poll when nothing changed;
* ``prune_s``: ``keys prune`` of release 1 (bins shrink back), and ``after_prune_*``
  what the device downloads for its release-2 envelope then.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import x25519
from tuf.ngclient.updater import Updater
from tuf.ngclient.urllib3_fetcher import Urllib3Fetcher

from edgepack import envelope, repo
from edgepack.fleetreport import device_id_for
from edgepack.repo import _envelopes

MODEL = "digits"


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

    def take(self) -> tuple[int, int]:
        """(bytes, requests) since the last call."""
        out = (self.bytes, len(self.requests))
        self.bytes, self.requests = 0, []
        return out


def _fleet(count: int) -> list[_envelopes.Device]:
    return [
        _envelopes.Device(
            device_id_for(os.urandom(32)), x25519.X25519PrivateKey.generate().public_key()
        )
        for _ in range(count)
    ]


def _tiny_onnx(filler: bytes) -> bytes:
    """An Identity model carrying ``filler`` in an unused initializer (onnx: builder side)."""
    from onnx import TensorProto, helper

    pad = helper.make_tensor("pad", TensorProto.UINT8, [len(filler)], filler, raw=True)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [pad],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data: bytes = model.SerializeToString()
    return data


def _repository(base: Path) -> tuple[Path, list[_envelopes.Release]]:
    """A repository with releases 1.0.0 and 2.0.0 (4 KiB models), their keys recovered."""
    from edgepack.bundle import pack
    from edgepack.keys import generate_recipient_key, generate_signing_key, write_keypair
    from edgepack.signing import ProducerKeySigner

    workdir = base / "repo"
    repo.init(workdir, passphrase=None)
    team = write_keypair(base / "team", generate_signing_key())
    repo.add_model(workdir, MODEL, team.public, passphrase=repo.no_passphrase)
    producer, publisher = ProducerKeySigner(generate_signing_key()), generate_recipient_key()
    releases = []
    for version in ("1.0.0", "2.0.0"):
        model_dir = base / f"m-{version}"
        model_dir.mkdir()
        (model_dir / "model.onnx").write_bytes(_tiny_onnx(os.urandom(4096)))
        bundle = pack(
            model_dir,
            base,
            name=MODEL,
            version=version,
            recipients=[publisher.public_key()],
            signer=producer,
        ).path
        repo.publish(workdir, [bundle], key=str(team.private), passphrase=repo.no_passphrase)
        releases.append(_envelopes.release_of(bundle, publisher))
    return workdir, releases


def _sizes(directory: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in directory.rglob("*") if p.is_file()}


def _wrap_once(base: Path, fleet: list[_envelopes.Device]) -> dict[str, Any]:
    workdir, releases = _repository(base)
    meta_before = _sizes(workdir / "public/metadata")
    t = time.perf_counter()
    result = _envelopes.wrap(workdir, releases[:1], fleet, passphrase=repo.no_passphrase)
    wrap_s = time.perf_counter() - t
    meta_after = _sizes(workdir / "public/metadata")
    written = {p: s for p, s in meta_after.items() if meta_before.get(p) != s}
    keys_dir = workdir / "public/targets/keys"
    return {
        "workdir": workdir,
        "releases": releases,
        "wrap_s": wrap_s,
        "bins": result.summary["bins"],
        "metadata_bytes": sum(written.values()),
        "metadata_files": len(written),
        "envelope_bytes": sum(_sizes(keys_dir).values()),
    }


def _newest_snapshot(workdir: Path) -> Path:
    meta = workdir / "public/metadata"
    return max(meta.glob("*.snapshot.json"), key=lambda p: int(p.name.split(".")[0]))


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


def _fetch_envelope(updater: Updater, device_id: str, version: str, home: Path) -> None:
    path = envelope.envelope_target_path(MODEL, version, device_id)
    info = updater.get_targetinfo(path)
    assert info is not None, path
    updater.download_target(info, str(home / f"{version}.json"))


def measure(size: int, repeat: int, base: Path) -> dict[str, Any]:
    """Wrap for ``size`` devices (``repeat`` fresh repositories), then measure a device."""
    fleet = _fleet(size + 1)
    devices, late = fleet[:size], fleet[size]
    runs = []
    for i in range(repeat):
        run_dir = base / f"{size}-{i}"
        run_dir.mkdir()
        runs.append(_wrap_once(run_dir, devices))
        if i < repeat - 1:
            shutil.rmtree(run_dir)
    last = runs[-1]
    workdir: Path = last["workdir"]
    releases = last["releases"]

    t = time.perf_counter()
    _envelopes.wrap(workdir, releases[:1], [late], passphrase=repo.no_passphrase)
    add_one_s = time.perf_counter() - t
    snapshot_one = _newest_snapshot(workdir).stat().st_size

    server = repo.make_server(workdir, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    root = (workdir / "public/metadata/1.root.json").read_bytes()
    home = base / f"device-{size}"
    me = devices[size // 2].device_id
    try:
        updater, fetcher = _device(url, home, root)
        updater.refresh()
        _fetch_envelope(updater, me, "1.0.0", home)
        fresh = fetcher.take()

        t = time.perf_counter()
        second = _envelopes.wrap(workdir, releases[1:], devices, passphrase=repo.no_passphrase)
        second_s = time.perf_counter() - t
        snapshot_two = _newest_snapshot(workdir).stat().st_size

        updater, fetcher = _device(url, home, root)
        updater.refresh()
        _fetch_envelope(updater, me, "2.0.0", home)
        uptodate = fetcher.take()

        updater, fetcher = _device(url, home, root)
        updater.refresh()
        idle = fetcher.take()

        t = time.perf_counter()
        pruned = _envelopes.prune(workdir, MODEL, ["1.0.0"], passphrase=repo.no_passphrase)
        prune_s = time.perf_counter() - t
        updater, fetcher = _device(url, home, root)
        updater.refresh()
        _fetch_envelope(updater, me, "2.0.0", home)
        after_prune = fetcher.take()
        snapshot_pruned = _newest_snapshot(workdir).stat().st_size
    finally:
        server.shutdown()
        server.server_close()
    return {
        "devices": size,
        "bins": last["bins"],
        "wrap_s": round(statistics.median(r["wrap_s"] for r in runs), 2),
        "wrap_s_runs": [round(r["wrap_s"], 2) for r in runs],
        "metadata_bytes": last["metadata_bytes"],
        "metadata_files": last["metadata_files"],
        "envelope_bytes": last["envelope_bytes"],
        "add_one_s": round(add_one_s, 3),
        "second_wrap_s": round(second_s, 2),
        "bins_after_second": second.summary["bins"],
        "snapshot_bytes": snapshot_one,
        "snapshot_two_releases_bytes": snapshot_two,
        "fresh_bytes": fresh[0],
        "fresh_requests": fresh[1],
        "uptodate_bytes": uptodate[0],
        "uptodate_requests": uptodate[1],
        "idle_bytes": idle[0],
        "idle_requests": idle[1],
        "prune_s": round(prune_s, 2),
        "bins_after_prune": pruned.summary["bins"],
        "snapshot_after_prune_bytes": snapshot_pruned,
        "after_prune_bytes": after_prune[0],
        "after_prune_requests": after_prune[1],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        rows = []
        for s in args.sizes.split(","):
            rows.append(measure(int(s), args.repeat, Path(tmp)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps(rows, indent=2))
    print()
    print(
        "| devices | bins | wrap all (s) | metadata written (bytes) | envelopes (bytes) "
        "| wrap one more (s) | snapshot (bytes) | fresh device (bytes, requests) "
        "| next release wrapped: bins, snapshot, up-to-date device (bytes, requests) "
        "| release 1 pruned: prune (s), bins, device (bytes, requests) | nothing new (bytes) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['devices']:,} | {r['bins']} | {r['wrap_s']} | {r['metadata_bytes']:,} "
            f"| {r['envelope_bytes']:,} | {r['add_one_s']} | {r['snapshot_bytes']:,} "
            f"| {r['fresh_bytes']:,}, {r['fresh_requests']} "
            f"| {r['bins_after_second']}, {r['snapshot_two_releases_bytes']:,}, "
            f"{r['uptodate_bytes']:,}, {r['uptodate_requests']} "
            f"| {r['prune_s']}, {r['bins_after_prune']}, {r['after_prune_bytes']:,}, "
            f"{r['after_prune_requests']} | {r['idle_bytes']:,} |"
        )
    if len(rows) >= 2:
        small, big = rows[0], rows[-1]
        print()
        print(
            f"fresh-device bytes ×{big['fresh_bytes'] / small['fresh_bytes']:.2f} for "
            f"×{big['devices'] / small['devices']:g} devices; wrap time "
            f"×{big['wrap_s'] / small['wrap_s']:.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
