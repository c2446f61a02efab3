"""A stand-in for the fleet service on loopback: real HTTP, real signature checks.

``POST /v1/reports`` is checked as the service checks it (the body's signature
against the registered identity with :func:`edgepack.fleetreport.verify`, the
report's fields with :func:`~edgepack.fleetreport.parse_report`, the counter
strictly growing) and every report taken is recorded. ``mode`` switches it to a
fault: ``down`` (the port closed), ``slow`` (answers after ``slow_s``), or a
fixed status (``500``, ``503``, ``409``, ``400``, ``401``, …).
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from edgepack import fleetreport
from edgepack.errors import InvalidInputError


def identity_of(data_dir: Path) -> bytes:
    """The raw identity public key of an enrolled device (what an operator registers)."""
    pem = (data_dir / "keys" / "identity.pub").read_bytes()
    key = serialization.load_pem_public_key(pem)
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _HTTPD

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _answer(self, status: int, message: str) -> None:
        body = json.dumps({"message": message}).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up (a timeout test)
            pass

    def do_POST(self) -> None:
        srv = self.server.fleet
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        signature = self.headers.get(fleetreport.SIGNATURE_HEADER)
        with srv.lock:
            srv.attempts += 1
            mode = srv.mode
        if self.path != "/v1/reports":
            self._answer(404, "no such endpoint")
            return
        if mode == "slow":
            time.sleep(srv.slow_s)
            self._answer(202, "taken late")
            return
        if mode.isdigit():
            self._answer(int(mode), f"mode {mode}")
            return
        if self.headers.get("Content-Type") != "application/json":
            self._answer(415, "not JSON")
            return
        try:
            device = fleetreport.device_id_of(body)
        except InvalidInputError as exc:
            self._answer(400, exc.message)
            return
        key = srv.devices.get(device)
        if key is None:
            self._answer(403, f"{device} is not registered")
            return
        if not fleetreport.verify(key, body, signature):
            self._answer(401, "bad signature")
            return
        try:
            report = fleetreport.parse_report(body)
        except InvalidInputError as exc:
            self._answer(400, exc.message)
            return
        with srv.lock:
            if report["counter"] <= srv.counters.get(device, 0):
                self._answer(409, "replayed: the counter did not grow")
                return
            srv.counters[device] = report["counter"]
            srv.reports.append(report)
            srv.bodies.append(body)
        self._answer(202, "taken")


class _HTTPD(http.server.ThreadingHTTPServer):
    """The HTTP server of one :class:`FleetServer` run (a new one after ``down``)."""

    daemon_threads = True

    def __init__(self, fleet: FleetServer) -> None:
        super().__init__(("127.0.0.1", fleet.port), _Handler)
        self.fleet = fleet


class FleetServer:
    """The fleet stand-in, restartable on the same port (for ``down``)."""

    def __init__(self) -> None:
        self.devices: dict[str, bytes] = {}
        self.counters: dict[str, int] = {}
        self.reports: list[dict[str, Any]] = []
        self.bodies: list[bytes] = []
        self.attempts = 0
        self.mode = "ok"
        self.slow_s = 3.0
        self.lock = threading.Lock()
        self._httpd: _HTTPD | None = None
        self.port = 0
        self._start()

    def _start(self) -> None:
        httpd = _HTTPD(self)
        self.port = httpd.server_address[1]
        self._httpd = httpd
        threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def register(self, data_dir: Path) -> str:
        raw = identity_of(data_dir)
        device = fleetreport.device_id_for(raw)
        self.devices[device] = raw
        return device

    def set(self, mode: str) -> None:
        """Switch the fault; ``down`` closes the port, anything else (re)opens it."""
        with self.lock:
            self.mode = mode
        if mode == "down" and self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        elif mode != "down" and self._httpd is None:
            self._start()

    def taken(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.reports)

    def stop(self) -> None:
        self.set("down")
