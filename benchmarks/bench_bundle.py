"""Bundle throughput and memory, as ratios to hashlib's sha256 over the same bytes in the same process.

    .venv/bin/python benchmarks/bench_bundle.py [--sizes 1,4] [--repeat 3] [--dir DIR]

For each payload size (GiB) a fresh child process writes a synthetic payload,
then measures (median of --repeat runs): sha256 of the file (the baseline),
a plain sequential write of as many bytes (the disk-side baseline: a bundle
must be written, and past the page cache's dirty limit that is disk-bound),
``pack`` (read + hash + encrypt + write), and ``verify`` with a recipient key
(read + decrypt + hash every file, nothing written). It reports the rates,
their ratios to the baseline, and its own peak RSS. Then: wrapping and
unwrapping a content key for 1,000 recipients, and the header size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GIB = 1024**3


def _sha256_file(path: Path) -> float:
    start = time.perf_counter()
    digest = hashlib.sha256()
    buffer = bytearray(1024 * 1024)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            digest.update(view[:n])
    return time.perf_counter() - start


def _write_file(path: Path, size: int, block: bytes) -> float:
    """A plain sequential write of ``size`` bytes (no fsync): the disk-side baseline for pack."""
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as handle:
        written = 0
        while written < size:
            written += handle.write(block[: min(len(block), size - written)])
    elapsed = time.perf_counter() - start
    path.unlink()
    os.sync()
    return elapsed


def write_payload(model: Path, size: int) -> None:
    """The synthetic model file, written by the parent so the child's peak RSS is ours alone."""
    model.mkdir(parents=True, exist_ok=True)
    block = memoryview(os.urandom(64 * 1024 * 1024))
    with open(model / "model.onnx", "wb") as handle:
        written = 0
        while written < size:
            written += handle.write(block[: min(len(block), size - written)])


def child(size_gib: float, repeat: int, workdir: Path) -> dict[str, Any]:
    """Run in a fresh process: measure one payload size and report peak RSS."""
    from edgepack.bundle import pack, verify
    from edgepack.keys import generate_recipient_key, generate_signing_key
    from edgepack.signing import ProducerKeySigner, TrustPolicy

    size = int(size_gib * GIB)
    model = workdir / "model"
    block = os.urandom(1024 * 1024)
    os.sync()  # start each measurement with no dirty pages from writing the source
    producer, recipient = generate_signing_key(), generate_recipient_key()
    signer = ProducerKeySigner(producer)
    policy = TrustPolicy.from_keys([producer.public_key()])
    sha, writes, packs, verifies = [], [], [], []
    for _ in range(repeat):
        sha.append(_sha256_file(model / "model.onnx"))
        writes.append(_write_file(workdir / "plain-write", size, block))
        out = workdir / "out"
        start = time.perf_counter()
        result = pack(
            model,
            out,
            name="bench",
            version="1.0.0",
            recipients=[recipient.public_key()],
            signer=signer,
        )
        packs.append(time.perf_counter() - start)
        start = time.perf_counter()
        verify(result.path, policy, recipient)
        verifies.append(time.perf_counter() - start)
        result.path.unlink()
        os.sync()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sha_t, pack_t, ver_t = (
        statistics.median(sha),
        statistics.median(packs),
        statistics.median(verifies),
    )
    write_t = statistics.median(writes)
    return {
        "size_gib": size_gib,
        "sha256_gbps": size / sha_t / 1e9,
        "pack_gbps": size / pack_t / 1e9,
        "verify_decrypt_gbps": size / ver_t / 1e9,
        "write_gbps": size / write_t / 1e9,
        "pack_ratio": sha_t / pack_t,
        "pack_ratio_to_slower_baseline": max(sha_t, write_t) / pack_t,
        "verify_ratio": sha_t / ver_t,
        "peak_rss_mb": rss_mb,
        "runs": repeat,
    }


def key_wrap(recipients: int = 1000) -> dict[str, Any]:
    """Wrap a content key for many recipients; unwrap as the last one (worst case lookup)."""
    from edgepack.bundle.metadata import EncryptionHeader, hpke_info
    from edgepack.crypto import new_content_key, new_nonce_prefix, unwrap_key, wrap_key
    from edgepack.keys import generate_recipient_key

    keys = [generate_recipient_key() for _ in range(recipients)]
    header = EncryptionHeader(1024 * 1024, new_nonce_prefix(), ())
    info = hpke_info("bench", "1.0.0", None, header)
    content = new_content_key()
    start = time.perf_counter()
    wrapped = tuple(wrap_key(content, k.public_key(), info) for k in keys)
    wrap_s = time.perf_counter() - start
    header = EncryptionHeader(header.segment_size, header.nonce_prefix, wrapped)
    start = time.perf_counter()
    assert unwrap_key(list(wrapped), keys[-1], info) == content
    unwrap_s = time.perf_counter() - start
    return {
        "recipients": recipients,
        "wrap_ms": wrap_s * 1000,
        "unwrap_ms": unwrap_s * 1000,
        "header_bytes": len(header.to_bytes()),
    }


def main() -> None:
    """Parse arguments and run each size in its own child process."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1,4", help="payload sizes in GiB, comma-separated")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--dir", type=Path, default=None, help="scratch directory (default: a temp dir)"
    )
    parser.add_argument("--child", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.repeat, args.dir)))
        return
    results = []
    for size in (float(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            write_payload(Path(tmp) / "model", int(size * GIB))
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    str(size),
                    "--repeat",
                    str(args.repeat),
                    "--dir",
                    tmp,
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            results.append(json.loads(proc.stdout))
    wrap = key_wrap()
    if args.json:
        print(json.dumps({"payload": results, "key_wrap": wrap}, indent=2))
        return
    print(
        f"{'payload':>8} {'sha256':>10} {'write':>10} {'pack':>10} {'/sha':>5} {'/slower':>7}"
        f" {'verify':>10} {'/sha':>5} {'peak RSS':>9}"
    )
    for r in results:
        print(
            f"{r['size_gib']:>6.1f}Gi {r['sha256_gbps']:>6.2f}GB/s {r['write_gbps']:>6.2f}GB/s"
            f" {r['pack_gbps']:>6.2f}GB/s {r['pack_ratio']:>5.2f} {r['pack_ratio_to_slower_baseline']:>7.2f}"
            f" {r['verify_decrypt_gbps']:>6.2f}GB/s {r['verify_ratio']:>5.2f} {r['peak_rss_mb']:>7.0f}MB"
        )
    print(
        f"key wrap for {wrap['recipients']} recipients: {wrap['wrap_ms']:.0f} ms; unwrap {wrap['unwrap_ms']:.2f} ms;"
        f" header {wrap['header_bytes']} bytes"
    )
    print(
        "goals: pack ratio >= 0.70, verify ratio >= 0.45, peak RSS < 200 MB at every size (medians)"
    )


if __name__ == "__main__":
    main()
