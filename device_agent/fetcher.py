"""The agent's network edge: an ngclient fetcher with limits, resumable downloads, offline source.

Following python-tuf's ``FetcherInterface`` (and its own ``Urllib3Fetcher``),
the public :meth:`AgentFetcher.fetch` enforces the limits (bandwidth cap,
slow-retrieval floor) around the private :meth:`AgentFetcher._open`, which only
moves bytes: over HTTP(S) with urllib3 (separate connect and read timeouts, one
deadline for the response head, ``Range`` requests, same-scheme redirects,
``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY``, a configurable CA bundle) or from a
directory holding a copy of the repository (``file://`` URLs: a USB stick or an
rsync'd mirror). Nothing here decides whether bytes are trustworthy; TUF and
the bundle reader do.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
import ssl
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any
from urllib.parse import unquote, urljoin, urlsplit

import urllib3
from tuf.api import exceptions
from tuf.ngclient.fetcher import FetcherInterface
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from device_agent._crashpoint import crashpoint
from device_agent.config import Limits
from device_agent.errors import ConfigError

log = logging.getLogger(__name__)

USER_AGENT = "edgepack-agent"
# A CDN or an object store answers with one or two redirects; more is a loop or a misconfiguration.
MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class RedirectRefusedError(exceptions.DownloadError):
    """A redirect to another scheme (``https`` to ``http``, to ``file:``) or one too many.

    A ``DownloadError``, so ngclient and the agent treat it as the transport
    failure it is (exit code 7), never as bad metadata.
    """


# -- the response deadline ------------------------------------------------------
# urllib3's read timeout bounds each receive, not the whole head: a server that
# drips one header byte a second would hold the agent (and its lock) for ever.
# A timer shuts down the sockets of the connections the current thread uses.
_local = threading.local()


class _Deadline:
    """Cut every connection the calling thread opens or uses once ``seconds`` have passed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = threading.Event()
        self._conns: list[HTTPConnection] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._cut) if seconds > 0 else None

    def watch(self, conn: HTTPConnection) -> None:
        with self._lock:
            if conn not in self._conns:
                self._conns.append(conn)
        if self.expired.is_set():
            self._cut()

    def _cut(self) -> None:
        self.expired.set()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            sock = conn.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> _Deadline:
        _local.deadline = self
        if self._timer is not None:
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._timer is not None:
            self._timer.cancel()
        _local.deadline = None


def _watch(conn: HTTPConnection) -> None:
    deadline: _Deadline | None = getattr(_local, "deadline", None)
    if deadline is not None:
        deadline.watch(conn)


class _WatchedHTTPConnection(HTTPConnection):
    """urllib3's connection, known to the calling thread's response deadline."""

    def connect(self) -> None:
        _watch(self)
        super().connect()

    def request(self, *args: Any, **kwargs: Any) -> None:
        _watch(self)  # a kept-alive connection does not connect again
        super().request(*args, **kwargs)


class _WatchedHTTPSConnection(HTTPSConnection):
    """urllib3's TLS connection, known to the calling thread's response deadline."""

    def connect(self) -> None:
        _watch(self)
        super().connect()

    def request(self, *args: Any, **kwargs: Any) -> None:
        _watch(self)
        super().request(*args, **kwargs)


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


# How urllib3 names a connection at the start of its messages: "<… object at 0x…>: "
# or "HTTPConnection(host='…', port=…): ". A person needs the URL, which we add.
_CONNECTION_PREFIX = re.compile(r"^(<[\w.]+ object at 0x[0-9a-f]+>|\w+\(host=.*?, port=\d+\)): ")


def _reason(exc: BaseException) -> str:
    """urllib3's message without the connection's name it starts with."""
    inner = getattr(exc, "reason", None)  # ProxyError and MaxRetryError carry the cause
    if isinstance(inner, BaseException):
        return _reason(inner)
    return _CONNECTION_PREFIX.sub("", str(exc)) or type(exc).__name__


class AgentFetcher(FetcherInterface):
    """Fetch repository files within the configured limits.

    ``ca_file`` is the PEM bundle that HTTPS servers are verified against
    (empty: the system's trust store, as ``ssl.create_default_context()``
    loads it); ``proxy`` is the proxy for every HTTP(S) URL (empty: the
    ``https_proxy``/``http_proxy`` environment variables). Hosts listed in
    ``no_proxy`` are always reached directly.
    """

    def __init__(
        self,
        limits: Limits | None = None,
        tmp_dir: Path | None = None,
        *,
        ca_file: str = "",
        proxy: str = "",
    ) -> None:
        self.limits = limits or Limits()
        self.tmp_dir = tmp_dir  # unverified bytes stay here (DATA/downloads), never in /tmp
        self.bytes_received = 0  # for status and benchmarks
        self.proxy = proxy
        if proxy and (
            urlsplit(proxy).scheme not in ("http", "https") or not urlsplit(proxy).hostname
        ):
            raise ConfigError(
                f"proxy {proxy!r} is not an http:// or https:// URL",
                hint="set proxy in config.toml to a URL such as http://proxy.example:3128",
            )
        self._ssl: ssl.SSLContext | None = None
        if ca_file:
            self._ssl = self._load_ca(ca_file)
        self._managers: dict[tuple[str, str], urllib3.PoolManager] = {}

    @staticmethod
    def _load_ca(ca_file: str) -> ssl.SSLContext:
        try:
            return ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"ca_file {ca_file}: cannot be used as a CA bundle ({exc})",
                hint="point ca_file in config.toml at a readable PEM file of CA certificates",
            ) from None

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:  # the system's trust store, made on the first https URL
            self._ssl = ssl.create_default_context()
        return self._ssl

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

    def _proxy_for(self, url: str) -> str:
        """The proxy URL for ``url``, or ``""`` to go direct (``no_proxy`` always wins)."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        if urllib.request.proxy_bypass(netloc):
            return ""
        if self.proxy:
            return self.proxy
        proxy = urllib.request.getproxies().get(parts.scheme, "")
        # "proxy.example:3128" in the environment means http:// to it, as curl reads it.
        return proxy if not proxy or "://" in proxy else f"http://{proxy}"

    def _manager(self, url: str) -> urllib3.PoolManager:
        """A pool manager per proxy (``""``: direct) and scheme, made on first use."""
        proxy, scheme = self._proxy_for(url), urlsplit(url).scheme
        manager = self._managers.get((proxy, scheme))
        if manager is not None:
            return manager
        tls: dict[str, Any] = {}
        if scheme == "https":  # the trust store is loaded only where it is needed
            tls["ssl_context"] = self._ssl_context()
        if proxy:
            auth = urllib3.util.parse_url(proxy).auth
            manager = urllib3.ProxyManager(
                proxy,
                num_pools=4,
                headers={"User-Agent": USER_AGENT},
                proxy_headers=urllib3.make_headers(proxy_basic_auth=auth) if auth else None,
                proxy_ssl_context=self._ssl_context() if proxy.startswith("https:") else None,
                **tls,
            )
        else:
            manager = urllib3.PoolManager(num_pools=4, headers={"User-Agent": USER_AGENT}, **tls)
        manager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
        self._managers[(proxy, scheme)] = manager
        return manager

    def _request(self, url: str, offset: int) -> urllib3.BaseHTTPResponse:
        """GET ``url`` (from ``offset``), following same-scheme redirects; the final head."""
        headers = {"User-Agent": USER_AGENT, "Connection": "close"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        timeout = urllib3.Timeout(
            connect=self.limits.connect_timeout_s, read=self.limits.read_timeout_s
        )
        scheme = urlsplit(url).scheme
        current = url
        with _Deadline(self.limits.response_timeout_s) as deadline:
            for hop in range(MAX_REDIRECTS + 1):
                try:
                    resp = self._manager(current).urlopen(
                        "GET",
                        current,
                        headers=headers,
                        redirect=False,
                        retries=False,
                        preload_content=False,
                        decode_content=False,
                        timeout=timeout,
                    )
                except (urllib3.exceptions.HTTPError, OSError) as exc:
                    if deadline.expired.is_set():
                        raise exceptions.SlowRetrievalError(
                            f"{url}: no complete response within {deadline.seconds:g} s"
                        ) from None
                    if isinstance(exc, urllib3.exceptions.TimeoutError) and not isinstance(
                        exc, urllib3.exceptions.NewConnectionError
                    ):
                        raise exceptions.SlowRetrievalError(
                            f"{current}: timed out ({_reason(exc)})"
                        ) from None
                    raise exceptions.DownloadError(
                        f"cannot reach {current}: {_reason(exc)}"
                    ) from None
                if deadline.expired.is_set():
                    resp.close()
                    raise exceptions.SlowRetrievalError(
                        f"{url}: no complete response within {deadline.seconds:g} s"
                    )
                if resp.status not in _REDIRECTS:
                    return resp
                location = resp.headers.get("Location")
                resp.close()  # the body of a redirect is not read: it could be endless
                resp.release_conn()
                if not location:
                    raise exceptions.DownloadHTTPError(
                        f"{current}: HTTP {resp.status} without a Location", resp.status
                    )
                target = urljoin(current, location)
                if urlsplit(target).scheme != scheme:
                    raise RedirectRefusedError(
                        f"{current}: redirect to {target} refused (only {scheme}:// to {scheme}:// is followed)"
                    )
                if hop == MAX_REDIRECTS:
                    raise RedirectRefusedError(
                        f"{url}: more than {MAX_REDIRECTS} redirects (the last to {target})"
                    )
                log.debug("%s: HTTP %d, following the redirect to %s", current, resp.status, target)
                current = target
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _open_http(self, url: str, offset: int) -> tuple[int, Iterator[bytes]]:
        resp = self._request(url, offset)
        if resp.status == 206 and offset:
            start = offset
        elif resp.status == 200:
            start = 0
        else:
            resp.close()
            resp.release_conn()
            raise exceptions.DownloadHTTPError(f"{url}: HTTP {resp.status}", resp.status)

        def chunks() -> Iterator[bytes]:
            try:
                while True:
                    try:
                        # read1: whatever has arrived (up to a chunk), so the speed
                        # floor is checked while a slow server trickles.
                        chunk = resp.read1(self.limits.chunk_bytes)
                    except urllib3.exceptions.ReadTimeoutError as exc:
                        raise exceptions.SlowRetrievalError(
                            f"download of {url} stalled: {_reason(exc)}"
                        ) from None
                    except (urllib3.exceptions.HTTPError, OSError) as exc:
                        raise exceptions.DownloadError(
                            f"download of {url} cut: {_reason(exc)}"
                        ) from None
                    if not chunk:
                        return
                    yield chunk
            finally:
                resp.close()
                resp.release_conn()

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
        self,
        url: str,
        part: Path,
        length: int,
        algorithms: tuple[str, ...] = ("sha256",),
        observers: Sequence[Any] = (),
    ) -> dict[str, str]:
        """Download ``url`` into ``part``, continuing what an earlier run left there.

        The partial file survives restarts; a server that ignores ``Range``
        makes the download start over. Stops with ``DownloadLengthMismatchError``
        past ``length`` bytes and with ``DownloadError`` when cut short.
        Returns the hex digests of the whole file, hashed as the bytes stream
        in (a resumed prefix is re-read once), so the caller can verify the
        file without a second pass over it. ``observers`` (objects with an
        ``update(bytes)``, like a hasher) see the same bytes in the same order,
        the resumed prefix included.
        """
        part.parent.mkdir(parents=True, exist_ok=True)
        have = part.stat().st_size if part.exists() else 0
        if have > length:
            part.unlink()
            have = 0
        hashers: list[Any] = [hashlib.new(a) for a in algorithms]
        digests = hashers
        hashers = [*hashers, *observers]
        if have == length:
            _hash_file(part, hashers)
            return {a: h.hexdigest() for a, h in zip(algorithms, digests, strict=True)}
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
        return {a: h.hexdigest() for a, h in zip(algorithms, digests, strict=True)}


def _hash_file(path: Path, hashers: list[Any]) -> None:
    with open(path, "rb") as fh:
        while block := fh.read(1024 * 1024):
            for h in hashers:
                h.update(block)
