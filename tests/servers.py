"""Real HTTP servers on loopback for end-to-end tests: nginx (production-like) and Python's.

``nginx_server(root)`` runs Debian's nginx in the foreground with a private
configuration serving ``root``; tests that need it skip with a clear reason
only where nginx is not installed (``tests/setup/install-services.sh``
installs it, and ``.ci/run`` calls that script).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/bin/nginx")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    """Block until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=0.5),
        ):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def nginx_binary() -> str | None:
    """Path of nginx, or None when it is not installed."""
    found = shutil.which("nginx")
    if found:
        return found
    return next((c for c in NGINX_CANDIDATES if os.access(c, os.X_OK)), None)


@contextlib.contextmanager
def nginx_server(root: Path) -> Iterator[str]:
    """Serve ``root`` with nginx on a free loopback port; yield the base URL."""
    binary = nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed (run tests/setup/install-services.sh as root)")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="edgepack-nginx-") as prefix:
        conf = Path(prefix) / "nginx.conf"
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf.write_text(
            f"""{user}daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    types {{ application/json json; application/octet-stream epk; }}
    default_type application/octet-stream;
    sendfile on;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        autoindex off;
        location /metadata/ {{ add_header Cache-Control "no-cache"; }}
        location /targets/ {{ add_header Cache-Control "public, max-age=31536000, immutable"; }}
    }}
}}
"""
        )
        proc = subprocess.Popen(
            [binary, "-p", prefix, "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait_for_port(port)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def python_server(root: Path) -> Iterator[str]:
    """Serve ``root`` with ``python -m http.server`` on a free loopback port."""
    import sys

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            str(port),
            "--bind",
            "127.0.0.1",
            "--directory",
            str(root),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
