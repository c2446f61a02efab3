"""The tuf-conformance client-under-test CLI, over the device agent's own TUF client.

Implements the three commands of the suite's client protocol (``init``,
``refresh``, ``download``; exit code 0 on full success, 1 otherwise) with
the agent's code: :class:`device_agent.tufclient.TufClient` (python-tuf's
ngclient over :class:`device_agent.fetcher.AgentFetcher`), the agent's
:class:`~device_agent.config.Limits` and an
:class:`~device_agent.config.AgentConfig` built the way enrolment builds one.

How the suite's directories map onto the agent's ``DATA`` layout:

- ``--metadata-dir`` is the agent's ``DATA/tuf/``: trusted metadata under
  non-versioned names (``root.json``, ``timestamp.json``, ...), which is
  what the suite inspects. ``init`` pins the root there as enrolment does.
- ``DATA`` itself is ``METADATA_DIR/agent-data/`` (it holds no ``.json``
  file at the top of the metadata dir, so the suite does not see it):
  ``DATA/downloads/`` is the agent's resumable, verified bundle cache
  (``<sha256>.part`` while downloading, ``<sha256>.epk`` once verified).
- ``--target-dir`` receives each verified artifact as one file named by its
  URL-quoted target path (``path%2Fto%2Ffile``), replaced when the target's
  content changes and left alone while its length and hashes still match
  (artifact caching, as the protocol asks).

Run it as ``python tests/conformance/agent_client.py ...`` (the package
``device_agent`` must be importable) or ``python -m tests.conformance.agent_client``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from tuf.api import exceptions
from tuf.api.metadata import TargetFile  # type: ignore[attr-defined]

from device_agent.config import AgentConfig, Limits
from device_agent.fetcher import AgentFetcher
from device_agent.tufclient import DOWNLOADS_DIR, TufClient, pin_root

DATA_SUBDIR = "agent-data"
DEVICE_ID = "tuf-conformance"


class ClientError(Exception):
    """A failure this CLI reports itself (the agent's own errors pass through as they are)."""


def _client(metadata_dir: Path, metadata_url: str, targets_url: str | None) -> TufClient:
    """The agent's TUF client, configured as enrolment would, over the suite's directories."""
    data_dir = metadata_dir / DATA_SUBDIR
    config = AgentConfig(
        data_dir=data_dir,
        device_id=DEVICE_ID,
        metadata_url=metadata_url,
        targets_url=targets_url or metadata_url,
        limits=Limits(),
    )
    fetcher = AgentFetcher(config.limits, tmp_dir=data_dir / DOWNLOADS_DIR)
    return TufClient(config, fetcher, metadata_dir=metadata_dir)


def init(metadata_dir: Path, trusted_root: Path) -> None:
    """Pin the trusted root; no request is made."""
    metadata_dir.mkdir(parents=True, exist_ok=True)
    pin_root(metadata_dir / DATA_SUBDIR, trusted_root.read_bytes(), metadata_dir=metadata_dir)


def refresh(metadata_dir: Path, metadata_url: str) -> None:
    """Update top-level metadata following the TUF client workflow."""
    _client(metadata_dir, metadata_url, None).refresh()


def _is_cached(path: Path, info: TargetFile) -> bool:
    """Whether ``path`` already holds the artifact ``info`` describes (length and every hash)."""
    try:
        with open(path, "rb") as fh:
            info.verify_length_and_hashes(fh)
    except (OSError, exceptions.LengthOrHashMismatchError):
        return False
    return True


def _place(source: Path, dest: Path) -> None:
    """Copy a verified artifact into the target dir atomically (a reader never sees half)."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
            while block := src.read(1024 * 1024):
                out.write(block)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def download(
    metadata_dir: Path, metadata_url: str, target_name: str, targets_url: str, target_dir: Path
) -> None:
    """Refresh, then download and verify one artifact into ``target_dir``."""
    client = _client(metadata_dir, metadata_url, targets_url)
    client.refresh()
    info = client.target_info(target_name)
    if info is None:
        raise ClientError(f"{target_name} is not a target of this repository")
    limit = client.config.limits.max_bundle_bytes
    if info.length > limit:
        raise ClientError(f"{target_name} is {info.length} bytes, above max_bundle_bytes ({limit})")
    target_dir.mkdir(parents=True, exist_ok=True)
    dest = target_dir / quote(info.path, "")
    if _is_cached(dest, info):
        return
    _place(client.download_bundle(info), dest)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent_client", description="tuf-conformance client over the edgepack agent"
    )
    parser.add_argument("--metadata-dir", required=True, type=Path)
    parser.add_argument("--metadata-url")
    parser.add_argument("--target-name")
    parser.add_argument("--target-base-url")
    parser.add_argument("--target-dir", type=Path)
    commands = parser.add_subparsers(dest="command", required=True)
    init_cmd = commands.add_parser("init", help="pin the given trusted root")
    init_cmd.add_argument("trusted_root", type=Path)
    commands.add_parser("refresh", help="update top-level metadata")
    commands.add_parser("download", help="download and verify one artifact")
    return parser


def _required(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is None]
    if missing:
        raise ClientError(f"{args.command} needs {', '.join(missing)}")


def run(argv: Sequence[str] | None = None) -> int:
    """Run one command; return the protocol's exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "init":
            init(args.metadata_dir, args.trusted_root)
        elif args.command == "refresh":
            _required(args, "metadata_url")
            refresh(args.metadata_dir, args.metadata_url)
        else:
            _required(args, "metadata_url", "target_name", "target_base_url", "target_dir")
            download(
                args.metadata_dir,
                args.metadata_url,
                args.target_name,
                args.target_base_url,
                args.target_dir,
            )
    except Exception as exc:  # the protocol has one failure code, whatever the cause
        print(f"agent_client {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
