"""``edgepack fleet serve``: the fleet service on uvicorn, until SIGTERM or SIGINT.

The store is opened and migrated once before listening (a bad URL or an
unreachable database is a one-line error, not a server that answers 503 to
everyone); then each worker thread of the app opens its own connection. The
service speaks plain HTTP: on anything but loopback put a TLS reverse proxy in
front (operator tokens and the dashboard travel in every request), or give
``tls_cert``/``tls_key`` to let uvicorn terminate TLS itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import uvicorn

from edgepack.errors import EdgepackError, InvalidInputError, KeyFileError
from edgepack.fleet.app import DEFAULT_STALE_AFTER_S, make_app

MAX_TOKEN_FILE = 64 * 1024
MIN_TOKEN_CHARS = 16


def read_tokens(path: Path) -> list[bytes]:
    """The operator tokens in ``path``: one a line, ``#`` comments and blank lines skipped.

    Several lines let operators rotate a token without a gap. The file must be
    readable by its owner only (like a private key) and hold at least one token
    of at least :data:`MIN_TOKEN_CHARS` characters.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        raise KeyFileError(
            f"token file {path} does not exist",
            hint="make one with `edgepack fleet token --out FILE`",
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot read token file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_TOKEN_FILE:
        raise KeyFileError(f"token file {path} is not a small regular file")
    if info.st_mode & 0o077:
        raise KeyFileError(
            f"token file {path} is readable by other users (mode {stat.S_IMODE(info.st_mode):04o})",
            hint=f"run: chmod 600 {path}",
        )
    tokens = []
    for line in path.read_bytes().splitlines():
        token = line.strip()
        if not token or token.startswith(b"#"):
            continue
        if len(token) < MIN_TOKEN_CHARS:
            raise KeyFileError(
                f"token file {path} holds a token shorter than {MIN_TOKEN_CHARS} characters",
                hint="make a strong one with `edgepack fleet token --out FILE`",
            )
        tokens.append(token)
    if not tokens:
        raise KeyFileError(f"token file {path} holds no token")
    return tokens


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    db_url: str,
    host: str,
    port: int,
    token_file: Path,
    *,
    log_level: str = "info",
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    announce: Callable[[str], None] | None = None,
) -> None:
    """Serve the fleet in ``db_url`` on ``host:port`` until SIGTERM or SIGINT.

    ``announce`` gets the line "fleet service on URL (store URL)" once the port
    listens (default: print it on stdout); with ``port`` 0 it names the port the
    system chose.
    """
    tokens = read_tokens(token_file)
    if (tls_cert is None) != (tls_key is None):
        raise InvalidInputError("give both --tls-cert and --tls-key, or neither")
    _configure_logging(log_level)
    sock = listen(host, port)
    try:
        _serve_on(sock, db_url, host, tokens, log_level, stale_after_s, tls_cert, tls_key, announce)
    finally:
        sock.close()


def _serve_on(
    sock: socket.socket,
    db_url: str,
    host: str,
    tokens: list[bytes],
    log_level: str,
    stale_after_s: float,
    tls_cert: Path | None,
    tls_key: Path | None,
    announce: Callable[[str], None] | None,
) -> None:
    from edgepack.fleet.sql import open_store

    store = open_store(db_url)
    try:
        store.migrate()
        shown_url = store.url
    finally:
        store.close()
    if not _loopback(host) and tls_cert is None:
        logging.getLogger("edgepack.fleet").warning(
            "serving on %s without TLS: put a TLS reverse proxy in front "
            "(operator tokens travel in every request)",
            host,
        )
    app = make_app(
        lambda: open_store(db_url, migrate=False),
        operator_tokens=tokens,
        stale_after_s=stale_after_s,
    )
    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=False,  # the app logs its own line per request, never the query string
        log_config=None,
        server_header=False,
        proxy_headers=False,
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
        timeout_graceful_shutdown=10,
    )
    server = _Server(config)
    scheme = "https" if tls_cert else "http"
    bound = sock.getsockname()[1]
    shown_host = f"[{host}]" if ":" in host else host

    def say(line: str) -> None:
        if announce is not None:
            announce(line)
        else:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    async def run() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started:
            say(f"fleet service on {scheme}://{shown_host}:{bound} ({shown_url})")
        with contextlib.suppress(SystemExit):  # uvicorn exits 3 when start-up failed
            await task

    asyncio.run(run())
    if not server.started:
        raise EdgepackError(f"the fleet service could not start on {host}:{bound}")


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: one the system picks), or a
    one-line error: bound here rather than by uvicorn, whose bind failure is a traceback."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise InvalidInputError(f"cannot resolve --host {host!r}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise EdgepackError(
            f"cannot listen on {host}:{port}: {exc.strerror}",
            hint="choose another --port, or an address of this machine for --host",
        ) from None
    sock.set_inheritable(True)
    return sock


def _configure_logging(level: str) -> None:
    """Our loggers (access lines included) to stderr at ``level``, once."""
    root = logging.getLogger("edgepack")
    if not any(getattr(h, "_edgepack_fleet", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._edgepack_fleet = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level.upper() if level != "trace" else "DEBUG")
    uv = logging.getLogger("uvicorn")
    if not uv.handlers:
        uv.addHandler(root.handlers[-1])
    uv.setLevel(root.level)


class _Server(uvicorn.Server):
    """uvicorn's server, stopping on SIGTERM/SIGINT and then returning (exit 0)
    instead of re-raising the signal after its graceful shutdown as uvicorn does."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Stop gracefully on SIGINT/SIGTERM; restore the old handlers afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)
