"""A development HTTP server for the served tree (``WORKDIR/public``), loopback only.

Production serves the same directory with nginx, a CDN or an object store
(docs/repository.md); nothing here is needed there.
"""

from __future__ import annotations

import ipaddress
import socket
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from edgepack.errors import InvalidInputError
from edgepack.repo._settings import RepoPaths


class _QuietHandler(SimpleHTTPRequestHandler):
    """Serves files only: no directory listings, no request log noise."""

    def list_directory(self, path: str | Path) -> None:  # type: ignore[override]
        self.send_error(404, "Not Found")

    def log_message(self, format: str, *args: Any) -> None:
        return


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(
                ipaddress.ip_address(info[4][0]).is_loopback
                for info in socket.getaddrinfo(host, None)
            )
        except OSError:
            return False


def make_server(workdir: Path, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server for ``WORKDIR/public`` bound to a loopback address.

    ``port=0`` picks a free port (``server.server_address[1]``).
    """
    if not _is_loopback(host):
        raise InvalidInputError(
            f"the development server only binds loopback addresses, not {host!r}",
            hint="serve WORKDIR/public with nginx or an object store in production "
            "(docs/repository.md)",
        )
    public = RepoPaths(workdir).public
    if not (public / "metadata").is_dir():
        raise InvalidInputError(
            f"{workdir} has no public/metadata", hint="create it with: edgepack repo init"
        )
    handler = partial(_QuietHandler, directory=str(public))
    return ThreadingHTTPServer((host, port), handler)
