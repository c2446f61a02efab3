"""The agent's network edge: an ngclient fetcher with limits, resumable downloads, offline source.

Following python-tuf's ``FetcherInterface``, the public :meth:`AgentFetcher.fetch`
enforces the limits (bandwidth cap, slow-retrieval floor) around the private
:meth:`AgentFetcher._open`, which only moves bytes: over HTTP(S) with
``http.client`` (separate connect and read timeouts, ``Range`` requests) or
from a directory holding a copy of the repository (``file://`` URLs: a USB
stick or an rsync'd mirror). Nothing here decides whether bytes are
trustworthy; TUF and the bundle reader do.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit

from tuf.api import exceptions
from tuf.ngclient.fetcher import FetcherInterface

from device_agent._crashpoint import crashpoint
from device_agent.config import Limits

USER_AGENT = "edgepack-agent"


class AgentFetcher(FetcherInterface):
    """Fetch repository files within the configured limits."""

    def __init__(self, limits: Limits | None = None, tmp_dir: Path | None = None) -> None:
        self.limits = limits or Limits()
        self.tmp_dir = tmp_dir  # unverified bytes stay here (DATA/downloads), never in /tmp
        self.bytes_received = 0  # for status and benchmarks

    # -- the private transport ------------------------------------------------
    def _open(self, url: str, offset: int) -> tuple[int, Iterator[bytes]]:
        """Start reading ``url`` at ``offset``; return where the bytes really start."""
        parts = urlsplit(url)
        if parts.scheme == "file":
            return self._open_file(Path(unquote(parts.path)), offset)
        if parts.scheme not in ("http", "https"):
            raise exceptions.DownloadError(f"unsupported URL scheme in {url}")
        return self._open_http(url, offset)

    def _open_file(self, path: Path, offset: int) -> tuple[int, Iterator[bytes]]:
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed by the generator below
        except (FileNotFoundError, NotADirectoryError):
            raise exceptions.DownloadHTTPError(
                f"{path} not found in the offline source", 404
            ) from None
        except OSError as exc:
            raise exceptions.DownloadError(f"cannot read {path}: {exc}") from exc
        size = os.fstat(fh.fileno()).st_size
        start = offset if offset <= size else 0
        fh.seek(start)

        def chunks() -> Iterator[bytes]:
            with fh:
                while chunk := fh.read(self.limits.chunk_bytes):
                    yield chunk

        return start, chunks()

    def _open_http(self, url: str, offset: int) -> tuple[int, Iterator[bytes]]:
        parts = urlsplit(url)
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(parts.netloc, timeout=self.limits.connect_timeout_s)
        else:
            conn = http.client.HTTPConnection(parts.netloc, timeout=self.limits.connect_timeout_s)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        headers = {"User-Agent": USER_AGENT}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        # One deadline for connecting and receiving the whole response head: the
        # per-receive timeout alone lets a server drip header bytes for ever.
        deadline = self.limits.response_timeout_s
        expired = threading.Event()

        def cut() -> None:
            expired.set()
            with contextlib.suppress(OSError):
                if conn.sock is not None:
                    conn.sock.shutdown(socket.SHUT_RDWR)

        timer = threading.Timer(deadline, cut) if deadline > 0 else None
        try:
            if timer is not None:
                timer.daemon = True
                timer.start()
            conn.connect()
            if conn.sock is not None:
                conn.sock.settimeout(self.limits.read_timeout_s)
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            if expired.is_set():
                raise exceptions.SlowRetrievalError(
                    f"{url}: no complete response within {deadline:g} s"
                ) from None
            raise exceptions.DownloadError(f"cannot reach {url}: {exc}") from exc
        finally:
            if timer is not None:
                timer.cancel()
        if expired.is_set():
            conn.close()
            raise exceptions.SlowRetrievalError(
                f"{url}: no complete response within {deadline:g} s"
            )
        if resp.status == 206 and offset:
            start = offset
        elif resp.status == 200:
            start = 0
        else:
            conn.close()
            raise exceptions.DownloadHTTPError(f"{url}: HTTP {resp.status}", resp.status)

        def chunks() -> Iterator[bytes]:
            try:
                while True:
                    try:
                        chunk = resp.read1(self.limits.chunk_bytes)
                    except (OSError, http.client.HTTPException) as exc:
                        raise exceptions.DownloadError(f"download of {url} cut: {exc}") from exc
                    if not chunk:
                        return
                    yield chunk
            finally:
                conn.close()

        return start, chunks()

    def _fetch(self, url: str) -> Iterator[bytes]:
        return self._open(url, 0)[1]

    # -- the public, limited interface ---------------------------------------
    def _limited(self, url: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
        """Apply the bandwidth cap and the slow-retrieval floor to a stream."""
        started = time.monotonic()
        received = 0
        for chunk in chunks:
            received += len(chunk)
            self.bytes_received += len(chunk)
            elapsed = time.monotonic() - started
            cap = self.limits.bandwidth_bps
            if cap and received / cap > elapsed:
                time.sleep(received / cap - elapsed)
                elapsed = time.monotonic() - started
            floor = self.limits.min_speed_bps
            if floor and elapsed > self.limits.slow_grace_s and received / elapsed < floor:
                raise exceptions.SlowRetrievalError(
                    f"{url}: {received / elapsed:.0f} B/s is below the floor of {floor} B/s"
                )
            yield chunk

    def fetch(self, url: str) -> Iterator[bytes]:
        """Fetch ``url`` whole, within the limits; raises only ``DownloadError``s."""
        try:
            _, chunks = self._open(url, 0)
        except exceptions.DownloadError:
            raise
        except Exception as exc:
            raise exceptions.DownloadError(f"failed to download {url}: {exc}") from exc
        return self._limited(url, chunks)

    @contextlib.contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        """ngclient's whole-file download, spooled in memory and then in ``tmp_dir``."""
        if self.tmp_dir is not None:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.SpooledTemporaryFile(
            max_size=1024 * 1024, dir=None if self.tmp_dir is None else str(self.tmp_dir)
        ) as temp_file:
            received = 0
            for chunk in self.fetch(url):
                received += len(chunk)
                if received > max_length:
                    raise exceptions.DownloadLengthMismatchError(
                        f"{url} is longer than the allowed {max_length} bytes"
                    )
                temp_file.write(chunk)
            temp_file.seek(0)
            yield temp_file

    def download_resumable(
        self, url: str, part: Path, length: int, algorithms: tuple[str, ...] = ("sha256",)
    ) -> dict[str, str]:
        """Download ``url`` into ``part``, continuing what an earlier run left there.

        The partial file survives restarts; a server that ignores ``Range``
        makes the download start over. Stops with ``DownloadLengthMismatchError``
        past ``length`` bytes and with ``DownloadError`` when cut short.
        Returns the hex digests of the whole file, hashed as the bytes stream
        in (a resumed prefix is re-read once), so the caller can verify the
        file without a second pass over it.
        """
        part.parent.mkdir(parents=True, exist_ok=True)
        have = part.stat().st_size if part.exists() else 0
        if have > length:
            part.unlink()
            have = 0
        hashers = [hashlib.new(a) for a in algorithms]
        if have == length:
            _hash_file(part, hashers)
            return {a: h.hexdigest() for a, h in zip(algorithms, hashers, strict=True)}
        try:
            start, chunks = self._open(url, have)
        except exceptions.DownloadError:
            raise
        except Exception as exc:
            raise exceptions.DownloadError(f"failed to download {url}: {exc}") from exc
        if start:
            _hash_file(part, hashers)
        total = start
        with open(part, "ab" if start == have else "wb") as out:
            if start == 0:
                out.truncate(0)
            try:
                for chunk in self._limited(url, chunks):
                    total += len(chunk)
                    if total > length:
                        raise exceptions.DownloadLengthMismatchError(
                            f"{url} is longer than the {length} bytes its metadata promises"
                        )
                    out.write(chunk)
                    for h in hashers:
                        h.update(chunk)
                    crashpoint("download-chunk")
            finally:
                with contextlib.suppress(OSError):
                    out.flush()
                    os.fsync(out.fileno())
        if total < length:
            raise exceptions.DownloadError(f"{url} ended after {total} of {length} bytes")
        return {a: h.hexdigest() for a, h in zip(algorithms, hashers, strict=True)}


def _hash_file(path: Path, hashers: list[Any]) -> None:
    with open(path, "rb") as fh:
        while block := fh.read(1024 * 1024):
            for h in hashers:
                h.update(block)
