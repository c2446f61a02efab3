"""The fleet service over real HTTP: the real app on uvicorn on a loopback port, a real
store (SQLite and PostgreSQL), urllib3 as the client (a raw socket where HTTP framing
itself is the attack). Every refusal is checked by its status, its error word, and the
store afterwards (nothing refused is stored)."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import urllib3
import uvicorn

from edgepack import fleetreport
from edgepack.fleet.app import make_app
from edgepack.fleet.sql import open_store
from edgepack.fleet.store import FleetStore
from tests.fleet._devices import FakeDevice, model_entry
from tests.servers import free_port

TOKEN = b"operator-token-0123456789abcdef"
AUTH = {"Authorization": "Bearer " + TOKEN.decode()}
HTTP = urllib3.PoolManager(retries=False, timeout=10.0)


@contextlib.contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on a free loopback port; yield its base URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@dataclass
class Service:
    """A running fleet service and the store behind it."""

    url: str
    store: FleetStore

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> urllib3.BaseHTTPResponse:
        return HTTP.request(method, self.url + path, body=body, headers=headers or {})

    def enrol(self, device: FakeDevice) -> None:
        response = self.request("POST", "/v1/devices", device.record_bytes(), AUTH)
        assert response.status == 201, response.data

    def send(
        self, device: FakeDevice, body: bytes, signature: str | None = None
    ) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        sig = device.sign(body) if signature is None else signature
        if sig:
            headers[fleetreport.SIGNATURE_HEADER] = sig
        response = self.request("POST", "/v1/reports", body, headers)
        return response.status, response.json()


@pytest.fixture
def service(store_url: str) -> Iterator[Service]:
    """The fleet service over a fresh store of each backend."""
    store = open_store(store_url)
    try:
        with running(make_app(store, operator_tokens=[TOKEN])) as url:
            yield Service(url, store)
    finally:
        store.close()


@pytest.fixture
def sqlite_service(tmp_path: Path) -> Iterator[Service]:
    """The fleet service on SQLite only, for what does not depend on the backend."""
    store = open_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    try:
        with running(make_app(store, operator_tokens=[TOKEN])) as url:
            yield Service(url, store)
    finally:
        store.close()


def assert_nothing_stored(store: FleetStore, device: FakeDevice) -> None:
    assert store.last_report(device.device_id) is None
    assert [s for s in store.states() if s.device_id == device.device_id] == []
    registered = store.device(device.device_id)
    if registered is not None:
        assert registered.last_counter == 0


def raw_exchange(port: int, data: bytes, *, wait: float = 5.0) -> bytes:
    """Send raw bytes, half-close nothing, and read what the server answers within ``wait``."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and b'"}' in chunk:
                    break
        return b"".join(chunks)


def test_register_report_and_read_the_fleet(service: Service) -> None:
    device = FakeDevice()
    service.enrol(device)
    again = service.request("POST", "/v1/devices", device.record_bytes(), AUTH)
    assert (again.status, again.json()) == (200, {"device_id": device.device_id, "created": False})

    body = device.report({"detector": model_entry(version="2.0.0")})
    assert service.send(device, body) == (202, {"accepted": 1})

    status = service.request("GET", "/v1/status?model=detector&stale_after=1h", headers=AUTH)
    assert status.status == 200
    (release,) = status.json()["releases"]
    assert (release["version"], release["running"], release["failed"]) == ("2.0.0", 1, {})

    listed = service.request("GET", "/v1/devices", headers=AUTH).json()["devices"]
    assert [d["device_id"] for d in listed] == [device.device_id]
    assert listed[0]["identity"] == "ed25519:" + fleetreport.public_raw(device.key).hex()

    shown = service.request("GET", f"/v1/devices/{device.device_id}", headers=AUTH)
    assert shown.json()["last_report"] == json.loads(body)
    assert service.request("GET", "/v1/devices/dev-" + "0" * 20, headers=AUTH).status == 404

    revoked = service.request(
        "POST", f"/v1/devices/{device.device_id}/revoke", b'{"reason": "stolen"}', AUTH
    )
    assert revoked.status == 200
    assert service.store.device(device.device_id).revoked_reason == "stolen"  # type: ignore[union-attr]
    # A revoked device's record cannot register it back.
    assert service.request("POST", "/v1/devices", device.record_bytes(), AUTH).status == 409


def test_refusals_over_http(service: Service) -> None:
    """Each bad report gets its status and error word, and none is stored."""
    device, other, stranger, revoked = FakeDevice(), FakeDevice(), FakeDevice(), FakeDevice()
    for d in (device, other, revoked):
        service.enrol(d)
    assert (
        service.request("POST", f"/v1/devices/{revoked.device_id}/revoke", b"", AUTH).status == 200
    )

    good = device.report()
    cases = {
        "forged": (good, other.sign(good), 401, "bad-signature"),
        "unsigned": (good, "", 401, "unsigned"),
        "garbage": (b"\x00not json at all", device.sign(b"x"), 400, "malformed"),
        "truncated": (
            good[: len(good) // 2],
            device.sign(good[: len(good) // 2]),
            400,
            "malformed",
        ),
        "unregistered": (
            stranger.report(),
            stranger.sign(stranger.report(counter=1)),
            403,
            "unregistered",
        ),
        "revoked": (revoked.report(), None, 403, "revoked"),
        "not-followed": (
            device.report({"detector": model_entry(), "other-model": model_entry()}),
            None,
            422,
            "model-not-followed",
        ),
    }
    for name, (body, signature, code, word) in cases.items():
        sender = revoked if name == "revoked" else device
        status, answer = service.send(sender, body, signature)
        assert (status, answer["error"]) == (code, word), name
        assert answer["message"], name
    for d in (device, other, stranger, revoked):
        assert_nothing_stored(service.store, d)


def test_a_device_revoked_after_reporting_is_refused_at_once(service: Service) -> None:
    """The service keeps identities between reports, never a device's revocation."""
    device = FakeDevice()
    service.enrol(device)
    first = device.report()
    assert service.send(device, first)[0] == 202
    path = f"/v1/devices/{device.device_id}/revoke"
    assert service.request("POST", path, b'{"reason": "stolen"}', AUTH).status == 200
    status, answer = service.send(device, device.report())
    assert (status, answer["error"]) == (403, "revoked")
    assert service.store.last_report(device.device_id) == json.loads(first)
    assert service.store.device(device.device_id).last_counter == 1  # type: ignore[union-attr]


def test_a_replayed_report_is_refused(service: Service) -> None:
    device = FakeDevice()
    service.enrol(device)
    body = device.report({"detector": model_entry(version="1.0.0")}, counter=5)
    assert service.send(device, body) == (202, {"accepted": 5})
    status, answer = service.send(device, body)
    assert (status, answer["error"]) == (409, "replayed")
    older = device.report({"detector": model_entry(version="0.1.0")}, counter=4)
    assert service.send(device, older)[0] == 409
    assert service.store.last_report(device.device_id) == json.loads(body)


def test_oversized_with_content_length(sqlite_service: Service) -> None:
    device = FakeDevice()
    sqlite_service.enrol(device)
    body = device.report()
    big = body[:-1] + b" " * (fleetreport.MAX_REPORT_BYTES + 1 - len(body)) + b"}"
    status, answer = sqlite_service.send(device, big)
    assert (status, answer["error"]) == (413, "too-large")
    # A huge Content-Length is refused at once, without waiting for (or reading) a byte of it.
    head = (
        "POST /v1/reports HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n"
        f"{fleetreport.SIGNATURE_HEADER}: {device.sign(body)}\r\n\r\n"
    ).encode()
    started = time.monotonic()
    answer_raw = raw_exchange(sqlite_service.port, head)
    assert answer_raw.startswith(b"HTTP/1.1 413"), answer_raw[:200]
    assert time.monotonic() - started < 3
    assert_nothing_stored(sqlite_service.store, device)


def test_oversized_without_content_length_is_cut_off_while_streaming(
    sqlite_service: Service,
) -> None:
    """Chunked, no Content-Length: the service answers 413 once it has read one byte too
    many, without waiting for the rest (which never comes here)."""
    device = FakeDevice()
    sqlite_service.enrol(device)
    chunk = b"x" * 4096
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5))  # 20 KiB, no end
    head = (
        "POST /v1/reports HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        f"{fleetreport.SIGNATURE_HEADER}: ed25519 AAAA\r\n\r\n"
    ).encode()
    answer = raw_exchange(sqlite_service.port, head + chunks)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"too-large"' in answer

    # And through urllib3's own chunked upload, a whole oversized body.
    response = HTTP.request(
        "POST",
        sqlite_service.url + "/v1/reports",
        body=iter([chunk] * 5),
        chunked=True,
        headers={fleetreport.SIGNATURE_HEADER: "ed25519 AAAA"},
    )
    assert response.status == 413
    assert_nothing_stored(sqlite_service.store, device)


def test_a_body_cut_off_in_transit_is_not_stored(sqlite_service: Service) -> None:
    device = FakeDevice()
    sqlite_service.enrol(device)
    body = device.report()
    head = (
        f"POST /v1/reports HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        f"{fleetreport.SIGNATURE_HEADER}: {device.sign(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", sqlite_service.port), timeout=5) as sock:
        sock.sendall(head + body[: len(body) // 2])
    time.sleep(0.3)
    assert_nothing_stored(sqlite_service.store, device)
    # The device's next, whole report is taken.
    assert sqlite_service.send(device, body)[0] == 202


def test_a_body_trickling_in_is_cut_off(tmp_path: Path) -> None:
    """A client that sends its report byte by byte cannot hold a worker for ever (408)."""
    store = open_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    device = FakeDevice()
    app = make_app(store, operator_tokens=[TOKEN], body_timeout_s=0.5)
    try:
        with running(app) as url:
            service = Service(url, store)
            service.enrol(device)
            body = device.report()
            head = (
                f"POST /v1/reports HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                f"{fleetreport.SIGNATURE_HEADER}: {device.sign(body)}\r\n\r\n"
            ).encode()
            with socket.create_connection(("127.0.0.1", service.port), timeout=5) as sock:
                sock.sendall(head + body[:10])
                started = time.monotonic()
                answer = sock.recv(65536)
                assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
                assert time.monotonic() - started < 3
            assert_nothing_stored(store, device)
    finally:
        store.close()


OPERATOR_CALLS = [
    ("GET", "/v1/status"),
    ("GET", "/v1/devices"),
    ("GET", "/v1/devices/dev-00000000000000000000"),
    ("POST", "/v1/devices"),
    ("POST", "/v1/devices/dev-00000000000000000000/revoke"),
    ("GET", "/"),
]


def test_operator_endpoints_need_the_operator_token(sqlite_service: Service) -> None:
    device = FakeDevice()
    record = device.record_bytes()
    for method, path in OPERATOR_CALLS:
        body = record if method == "POST" else None
        signed = {fleetreport.SIGNATURE_HEADER: device.sign(body or b"")}
        for headers, code in (
            ({}, 401),
            (signed, 401),  # a device's signature is no operator credential
            ({"Authorization": "Basic " + TOKEN.decode()}, 401),
            ({"Authorization": "Bearer "}, 401),
            ({"Authorization": "Bearer wrong-token-0123456789"}, 403),
            ({"Authorization": "Bearer " + TOKEN.decode() + "x"}, 403),
        ):
            response = sqlite_service.request(method, path, body, headers)
            assert response.status == code, (method, path, headers)
            assert device.device_id.encode() not in response.data
    # Nothing the refused calls asked for happened.
    assert sqlite_service.store.devices() == []


def test_healthz_needs_nothing_and_says_nothing(sqlite_service: Service) -> None:
    device = FakeDevice()
    sqlite_service.enrol(device)
    response = sqlite_service.request("GET", "/healthz")
    assert (response.status, response.json()) == (200, {"status": "ok"})
    assert b"dev-" not in response.data
    # Other paths and methods answer in the same JSON form.
    assert sqlite_service.request("GET", "/v1/nothing").json()["error"] == "not-found"
    wrong = sqlite_service.request("GET", "/v1/reports")
    assert (wrong.status, wrong.json()["error"]) == (405, "method-not-allowed")


def test_rotating_tokens_both_work(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    new = b"the-new-operator-token-0123456789"
    try:
        with running(make_app(store, operator_tokens=[TOKEN, new])) as url:
            service = Service(url, store)
            for token in (TOKEN, new):
                headers = {"Authorization": "Bearer " + token.decode()}
                assert service.request("GET", "/v1/devices", headers=headers).status == 200
            assert (
                service.request(
                    "GET",
                    "/v1/devices",
                    headers={"Authorization": "Bearer " + (TOKEN + new).decode()},
                ).status
                == 403
            )
    finally:
        store.close()


def test_the_dashboard_cookie_is_httponly_strict_and_not_an_api_credential(
    sqlite_service: Service,
) -> None:
    wrong = sqlite_service.request("GET", "/?token=not-the-token-at-all", None, {})
    assert wrong.status == 403
    response = HTTP.request("GET", sqlite_service.url + "/?token=" + TOKEN.decode(), redirect=False)
    assert (response.status, response.headers["Location"]) == (303, "/")
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert TOKEN.decode() not in cookie
    value = cookie.split(";", 1)[0]
    page = sqlite_service.request("GET", "/", headers={"Cookie": value})
    assert page.status == 200 and b'id="rollouts"' in page.data
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    assert sqlite_service.request("GET", "/v1/devices", headers={"Cookie": value}).status == 401
    assert (
        sqlite_service.request("GET", "/", headers={"Cookie": "edgepack_fleet=0" * 2}).status == 401
    )


def test_one_access_line_per_request_without_the_query(
    sqlite_service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edgepack.fleet.access")
    sqlite_service.request("GET", "/healthz")
    HTTP.request("GET", sqlite_service.url + "/?token=" + TOKEN.decode(), redirect=False)
    sqlite_service.request("POST", "/v1/reports", b"{}", {})
    time.sleep(0.1)
    lines = [r.getMessage() for r in caplog.records if r.name == "edgepack.fleet.access"]
    assert len(lines) == 3, lines
    assert '"GET /healthz" 200' in lines[0]
    assert '"GET /" 303' in lines[1] and TOKEN.decode() not in lines[1]
    assert '"POST /v1/reports" 401' in lines[2] and "unsigned" in lines[2]


def test_a_failed_database_is_503_and_nothing_is_acknowledged(pg_url: str) -> None:
    import psycopg

    from tests.pg import create_database

    url = create_database(pg_url, "t_service_503")
    store = open_store(url)
    device = FakeDevice()
    try:
        with running(make_app(store, operator_tokens=[TOKEN])) as base:
            service = Service(base, store)
            service.enrol(device)
            assert service.send(device, device.report())[0] == 202
            with psycopg.connect(pg_url, autocommit=True) as admin:
                admin.execute('DROP DATABASE "t_service_503" WITH (FORCE)')
            status, answer = service.send(device, device.report())
            assert (status, answer["error"]) == (503, "store-unavailable")
            response = service.request("GET", "/v1/devices", headers=AUTH)
            assert response.status == 503
    finally:
        store.close()
