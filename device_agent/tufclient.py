"""TUF client: python-tuf ngclient over the agent's fetcher, with resumable target downloads.

Metadata lives in ``DATA/tuf/`` (root pinned at enrolment). Small targets
(channel documents) are cached in ``DATA/tuf/targets/`` and reused while their
TUF hashes still match, so a poll with nothing new downloads only
``timestamp.json`` (plus the 404 of the next root version). Bundles go through
:meth:`TufClient.download_bundle`: resumable into ``DATA/downloads/``, then
checked against the TUF length and hashes before anything else reads them.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tuf.api import exceptions
from tuf.api.metadata import Metadata, Root, TargetFile  # type: ignore[attr-defined]
from tuf.ngclient.config import UpdaterConfig
from tuf.ngclient.updater import Updater

from device_agent import _atomic
from device_agent.config import AgentConfig
from device_agent.fetcher import AgentFetcher

TUF_DIR = "tuf"
DOWNLOADS_DIR = "downloads"


def pin_root(data_dir: Path, root_bytes: bytes, *, metadata_dir: Path | None = None) -> None:
    """Store the trusted root given at enrolment (checked to parse as TUF root metadata).

    It goes to ``DATA/tuf/`` unless ``metadata_dir`` names another place (the
    conformance CLI keeps metadata where the test suite reads it).
    """
    md = Metadata[Root].from_bytes(root_bytes)
    if not isinstance(md.signed, Root):
        raise exceptions.RepositoryError("the given root file is not TUF root metadata")
    tuf_dir = metadata_dir if metadata_dir is not None else data_dir / TUF_DIR
    tuf_dir.mkdir(parents=True, exist_ok=True)
    link = tuf_dir / "root.json"
    if link.is_symlink():
        link.unlink()
    _atomic.write_bytes(link, root_bytes)


class TufClient:
    """One poll's view of the repository (ngclient refreshes once per ``Updater``).

    ``metadata_dir`` replaces ``DATA/tuf/`` as the home of trusted metadata
    (see :func:`pin_root`); everything else stays under ``DATA``.
    """

    def __init__(
        self, config: AgentConfig, fetcher: AgentFetcher, *, metadata_dir: Path | None = None
    ) -> None:
        self.config = config
        self.fetcher = fetcher
        self.metadata_dir = metadata_dir if metadata_dir is not None else config.data_dir / TUF_DIR
        self.targets_cache = self.metadata_dir / "targets"
        self.downloads = config.data_dir / DOWNLOADS_DIR
        self.updater = Updater(
            metadata_dir=str(self.metadata_dir),
            metadata_base_url=config.metadata_url,
            target_base_url=config.targets_url,
            target_dir=str(self.targets_cache),
            fetcher=fetcher,
            config=UpdaterConfig(app_user_agent="edgepack-agent"),
            bootstrap=None,
        )

    def refresh(self) -> None:
        """Refresh top-level metadata (raises tuf's RepositoryError or DownloadError)."""
        self.updater.refresh()

    def target_info(self, path: str) -> TargetFile | None:
        """Verified length and hashes of a target, or ``None`` when the repository has none."""
        return self.updater.get_targetinfo(path)

    def target_url(self, info: TargetFile) -> str:
        """The URL of a target, hash-prefixed when the repository uses consistent snapshots."""
        root = Metadata[Root].from_file(str(self.metadata_dir / "root.json")).signed
        path = info.path
        if root.consistent_snapshot:
            digest = next(iter(info.hashes.values()))
            dirname, sep, basename = path.rpartition("/")
            path = f"{dirname}{sep}{digest}.{basename}"
        base = self.config.targets_url
        return base + ("" if base.endswith("/") else "/") + path

    def small_target(self, path: str, max_bytes: int) -> bytes | None:
        """Bytes of a small target (a channel document), from cache when unchanged."""
        info = self.target_info(path)
        if info is None:
            return None
        if info.length > max_bytes:
            raise exceptions.RepositoryError(
                f"{path} is {info.length} bytes, above the limit of {max_bytes}"
            )
        self.targets_cache.mkdir(parents=True, exist_ok=True)
        cached = self.targets_cache / quote(path, "")
        if self.updater.find_cached_target(info, str(cached)) is None:
            self.updater.download_target(info, str(cached))
        return cached.read_bytes()

    def bundle_path(self, sha256: str) -> Path:
        """Where a verified bundle is kept until it is installed."""
        return self.downloads / f"{sha256}.epk"

    def download_bundle(self, info: TargetFile, observers: Sequence[Any] = ()) -> Path:
        """Download (resuming) and verify a bundle; return the verified file's path.

        The partial file is ``DATA/downloads/<sha256>.part``; only after its
        length and every TUF hash match is it renamed to ``<sha256>.epk``. A
        mismatch deletes the partial file (the next attempt starts over).
        A target without a sha256 is refused (a ``RepositoryError``, not a
        ``KeyError``): the agent names and records bundles by their sha256.
        ``observers`` see every byte in order beside the hashes (the agent's
        :class:`device_agent.streamcheck.StreamCheck`).
        """
        sha256 = info.hashes.get("sha256")
        if sha256 is None:
            raise exceptions.RepositoryError(
                f"{info.path} has no sha256 in TUF metadata (bundles are named by it)"
            )
        final = self.bundle_path(sha256)
        if final.exists():
            return final
        part = self.downloads / f"{sha256}.part"
        algorithms = tuple(sorted(info.hashes))
        try:
            got = self.fetcher.download_resumable(
                self.target_url(info), part, info.length, algorithms, observers
            )
        except ValueError as exc:  # an unknown hash algorithm in the metadata
            raise exceptions.RepositoryError(f"{info.path}: {exc}") from exc
        if any(got[a] != info.hashes[a] for a in algorithms):
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
            raise exceptions.LengthOrHashMismatchError(
                f"{info.path}: the downloaded bytes do not match the TUF hashes"
            )
        part.replace(final)
        _atomic.fsync_dir(self.downloads)
        return final

    def clean_downloads(self, keep: set[str]) -> None:
        """Delete downloads (partial or complete) of bundles not in ``keep`` (sha256s)."""
        if not self.downloads.is_dir():
            return
        for entry in self.downloads.iterdir():
            if entry.name.split(".", 1)[0] not in keep:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()


def sha256_file(path: Path, chunk: int = 1024 * 1024) -> str:
    """Streamed SHA-256 of a file (used by benchmarks and checks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
