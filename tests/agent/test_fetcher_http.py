"""The fetcher over real HTTP(S) on loopback: redirects, proxies, a private CA, stalls.

Every server here is real: ``http.server`` on 127.0.0.1 (plain or TLS with a CA
made for the test), a forwarding proxy that also tunnels ``CONNECT``, and the
agent's served TUF repository (``World``) behind a redirecting front.
"""

from __future__ import annotations

import datetime
import http.client
import http.server
import ipaddress
import os
import re
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from tuf.api import exceptions

from device_agent import config, loop
from device_agent.agent import Agent
from device_agent.errors import ConfigError
from device_agent.fetcher import MAX_REDIRECTS, AgentFetcher, RedirectRefusedError
from device_agent.outcome import exit_code_of
from edgepack.errors import EdgepackError
from tests.agent._support import MODEL, World, fast_limits, run_agent

PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture(autouse=True)
def _no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no proxy variable set, in either case."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.delenv("REQUEST_METHOD", raising=False)


# -- servers ------------------------------------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    server: Loopback
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        self.server.requests.append((self.path, self.headers.get("Range")))
        self.server.answer(self)

    # what an ``answer`` does with the request
    def redirect(self, location: str, status: int = 302) -> None:
        self.send_response(status)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def send_bytes(self, data: bytes) -> None:
        """``data``, honouring ``Range: bytes=N-``."""
        rng = self.headers.get("Range")
        start = int(rng[6:].split("-")[0]) if rng and rng.startswith("bytes=") else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def drip_headers(self) -> None:
        """Start a response and never finish its head (a byte every 0.1 s)."""
        self.wfile.write(b"HTTP/1.1 200 OK\r\n")
        while not self.server.released.wait(0.1):
            try:
                self.wfile.write(b"X")
                self.wfile.flush()
            except OSError:
                return

    def stall_body(self, data: bytes) -> None:
        """Send the head and the first kilobyte, then nothing."""
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:1000])
        self.wfile.flush()
        self.server.released.wait(30)


class Loopback(http.server.ThreadingHTTPServer):
    """A loopback HTTP (or, with ``tls``, HTTPS) server; ``answer`` answers every GET."""

    daemon_threads = True

    def __init__(
        self, answer: Callable[[_Handler], None], tls: ssl.SSLContext | None = None
    ) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.answer = answer
        self.tls = tls
        self.requests: list[tuple[str, str | None]] = []
        self.released = threading.Event()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is not None:  # the handshake in the request's own thread
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                return
        super().finish_request(request, client_address)

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.released.set()
        self.shutdown()
        self.server_close()


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: Proxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        """Forward an absolute-URI GET, as a forwarding proxy does."""
        self.server.used.append(("GET", self.path))
        target = urlsplit(self.path)
        if target.scheme != "http" or not target.hostname:
            self.send_error(400, "absolute http:// URI expected")
            return
        upstream = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=10)
        forwarded = {k: v for k, v in self.headers.items() if k.lower() in ("range", "user-agent")}
        upstream.request("GET", target.path or "/", headers=forwarded)
        resp = upstream.getresponse()
        body = resp.read()
        self.send_response(resp.status)
        for key, value in resp.getheaders():
            if key.lower() in ("content-range", "location", "content-type"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True
        upstream.close()

    def do_CONNECT(self) -> None:
        """Open a tunnel to ``host:port`` and relay bytes both ways until one side closes."""
        self.server.used.append(("CONNECT", self.path))
        if self.server.stall_connect:
            self.server.released.wait(30)
            return
        host, _, port = self.path.rpartition(":")
        upstream = socket.create_connection((host, int(port)), timeout=10)
        self.send_response(200, "Connection established")
        self.end_headers()
        self.wfile.flush()
        ends = [self.connection, upstream]
        try:
            while True:
                ready, _, _ = select.select(ends, [], [], 10)
                if not ready:
                    return
                for end in ready:
                    data = end.recv(65536)
                    if not data:
                        return
                    (upstream if end is self.connection else self.connection).sendall(data)
        except OSError:
            return
        finally:
            upstream.close()
            self.close_connection = True


class Proxy(http.server.ThreadingHTTPServer):
    """A forwarding HTTP proxy on loopback that records each request it carried."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.used: list[tuple[str, str]] = []
        self.stall_connect = False
        self.released = threading.Event()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.released.set()
        self.shutdown()
        self.server_close()


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    p = Proxy()
    yield p
    p.stop()


@pytest.fixture
def serve() -> Iterator[Callable[..., Loopback]]:
    """Start loopback servers for a test; all are stopped after it."""
    started: list[Loopback] = []

    def start(answer: Callable[[_Handler], None], tls: ssl.SSLContext | None = None) -> Loopback:
        server = Loopback(answer, tls)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _front(to: str) -> Callable[[_Handler], None]:
    """A CDN-like front: every path 302s to the same path on ``to``."""
    return lambda h: h.redirect(to.rstrip("/") + h.path)


# -- a private CA ---------------------------------------------------------------------
class PrivateCA:
    """A CA made for the test and a server certificate for 127.0.0.1 signed by it."""

    def __init__(self, where: Path) -> None:
        now = datetime.datetime.now(datetime.timezone.utc)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgepack test CA")])
        ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ca_ski, critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        where.mkdir(parents=True, exist_ok=True)
        self.ca_file = where / "ca.pem"
        self.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        chain = where / "server.pem"
        chain.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self.server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_context.load_cert_chain(chain)


@pytest.fixture
def private_ca(tmp_path: Path) -> PrivateCA:
    return PrivateCA(tmp_path / "pki")


def _fetch(fetcher: AgentFetcher, url: str) -> bytes:
    return b"".join(fetcher.fetch(url))


def _poll(data_dir: Path) -> Any:
    outcomes = loop.poll_once(Agent(config.load(data_dir)))
    assert len(outcomes) == 1
    return outcomes[0]


def _set_config(data_dir: Path, **fields: str) -> None:
    cfg = config.load(data_dir)
    for key, value in fields.items():
        setattr(cfg, key, value)
    config.save(cfg)


# -- redirects ------------------------------------------------------------------------
def test_a_302_on_metadata_and_on_the_bundle_is_followed(
    world: World, tmp_path: Path, serve: Any
) -> None:
    """A CDN front that redirects every request: the device installs through it."""
    world.publish("1.0.0", 2.0)
    front = serve(_front(world.server.url))
    d = tmp_path / "dev"
    world.enroll(d, url=front.url)
    out = _poll(d)
    assert out.action == "installed", out.error
    fronted = [path for path, _ in front.requests]
    assert any(p.endswith("timestamp.json") for p in fronted)
    assert any(p.endswith(".epk") for p in fronted)
    assert world.server.bundle_requests(), "the bundle came from where the front pointed"


def test_range_resume_still_works_after_a_redirect(
    world: World, tmp_path: Path, serve: Any
) -> None:
    world.publish("1.0.0", 2.0, pad_bytes=200_000)
    front = serve(_front(world.server.url))
    d = tmp_path / "dev"
    world.enroll(d, url=front.url)
    world.server.fault, world.server.cut_at = "cut", 50_000
    assert _poll(d).action == "error"
    parts = list((d / "downloads").glob("*.part"))
    assert len(parts) == 1 and 0 < parts[0].stat().st_size < 200_000
    have = parts[0].stat().st_size
    world.server.fault = None
    world.server.requests.clear()
    front.requests.clear()
    assert _poll(d).action == "installed"
    behind = [r for _, r in world.server.bundle_requests()]
    assert behind == [f"bytes={have}-"], "the Range header survived the redirect"
    assert [r for p, r in front.requests if p.endswith(".epk")] == [f"bytes={have}-"]


@pytest.mark.parametrize(
    "target", ["file:///etc/passwd", "ftp://127.0.0.1/x", "https://127.0.0.1:1/x"]
)
def test_a_redirect_to_another_scheme_is_refused_naming_its_target(serve: Any, target: str) -> None:
    server = serve(lambda h: h.redirect(target))
    with pytest.raises(RedirectRefusedError, match="redirect to " + re.escape(target)):
        _fetch(AgentFetcher(fast_limits()), f"{server.url}/metadata/timestamp.json")
    assert len(server.requests) == 1
    assert exit_code_of(RedirectRefusedError("x")) == 7


def test_https_redirecting_to_http_is_refused(serve: Any, private_ca: PrivateCA) -> None:
    plain = serve(lambda h: h.send_bytes(b"downgraded"))
    server = serve(lambda h: h.redirect(plain.url + h.path), private_ca.server_context)
    fetcher = AgentFetcher(fast_limits(), ca_file=str(private_ca.ca_file))
    with pytest.raises(RedirectRefusedError, match=re.escape(f"redirect to {plain.url}/f refused")):
        _fetch(fetcher, f"{server.url}/f")
    assert plain.requests == []


def test_a_redirect_loop_is_bounded(serve: Any) -> None:
    server = serve(lambda h: h.redirect("/a" if h.path == "/b" else "/b"))
    start = time.monotonic()
    with pytest.raises(RedirectRefusedError, match=f"more than {MAX_REDIRECTS} redirects"):
        _fetch(AgentFetcher(fast_limits()), f"{server.url}/a")
    assert len(server.requests) == MAX_REDIRECTS + 1
    assert time.monotonic() - start < 5


def test_a_refused_redirect_is_exit_code_7_with_its_target_on_stderr(
    world: World, tmp_path: Path, serve: Any
) -> None:
    world.publish("1.0.0", 2.0)
    d = tmp_path / "dev"
    world.enroll(d, url=serve(lambda h: h.redirect("file:///etc/shadow")).url)
    env = {k: v for k, v in os.environ.items() if k != "EDGEPACK_DATA_DIR"}
    run = subprocess.run(
        [sys.executable, "-m", "device_agent", "run", "--once", "--data-dir", str(d)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert run.returncode == 7, run.stderr
    assert "redirect to file:///etc/shadow refused" in run.stderr
    assert "Traceback" not in run.stderr


# -- proxies --------------------------------------------------------------------------
def test_http_proxy_from_the_environment_is_used_and_no_proxy_bypasses_it(
    world: World, tmp_path: Path, proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.publish("1.0.0", 2.0)
    d = tmp_path / "dev"
    world.enroll(d)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    assert _poll(d).action == "installed"
    carried = [url for method, url in proxy.used if method == "GET"]
    assert any(u.startswith(world.server.url) and u.endswith("timestamp.json") for u in carried)
    assert any(u.endswith(".epk") for u in carried)

    proxy.used.clear()
    monkeypatch.setenv("NO_PROXY", "example.org, 127.0.0.1")
    world.publish("2.0.0", 3.0)
    assert _poll(d).action == "installed"
    assert proxy.used == [], "a host in NO_PROXY is reached directly"


def test_lowercase_http_proxy_without_a_scheme_and_the_bandwidth_cap_through_it(
    serve: Any, proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = os.urandom(60_000)
    server = serve(lambda h: h.send_bytes(body))
    monkeypatch.setenv(
        "http_proxy", proxy.url.removeprefix("http://")
    )  # host:port, as curl takes it
    fetcher = AgentFetcher(fast_limits(bandwidth_bps=200_000, chunk_bytes=10_000))
    start = time.monotonic()
    assert _fetch(fetcher, f"{server.url}/f.bin") == body
    assert time.monotonic() - start >= 0.25, "the bandwidth cap held"
    assert proxy.used == [("GET", f"{server.url}/f.bin")]


def test_the_proxy_setting_in_config_is_used(world: World, tmp_path: Path, proxy: Proxy) -> None:
    world.publish("1.0.0", 2.0)
    d = tmp_path / "dev"
    world.enroll(d)
    _set_config(d, proxy=proxy.url)
    assert 'proxy = "' + proxy.url + '"' in (d / "config.toml").read_text()
    assert _poll(d).action == "installed"
    assert any(url.endswith(".epk") for _, url in proxy.used)


def test_https_through_a_connect_tunnel(
    serve: Any, proxy: Proxy, private_ca: PrivateCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = serve(lambda h: h.send_bytes(b"through the tunnel"), private_ca.server_context)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    fetcher = AgentFetcher(fast_limits(), ca_file=str(private_ca.ca_file))
    assert _fetch(fetcher, f"{server.url}/f") == b"through the tunnel"
    port = server.server_address[1]
    assert proxy.used == [("CONNECT", f"127.0.0.1:{port}")]
    proxy.used.clear()
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    assert _fetch(fetcher, f"{server.url}/f") == b"through the tunnel"
    assert proxy.used == []


def test_a_proxy_that_never_answers_connect_hits_the_response_deadline(
    serve: Any, proxy: Proxy, private_ca: PrivateCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = serve(lambda h: h.send_bytes(b"never"), private_ca.server_context)
    proxy.stall_connect = True
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    limits = fast_limits(read_timeout_s=20.0, response_timeout_s=1.5)
    fetcher = AgentFetcher(limits, ca_file=str(private_ca.ca_file))
    start = time.monotonic()
    with pytest.raises(exceptions.SlowRetrievalError, match=r"within 1\.5 s"):
        _fetch(fetcher, f"{server.url}/f")
    assert time.monotonic() - start < 5


def test_a_proxy_setting_that_is_not_a_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not an http:// or https:// URL") as info:
        AgentFetcher(proxy="proxy.example:3128")
    assert info.value.exit_code == 3


# -- a private CA ----------------------------------------------------------------------
def test_ca_file_trusts_a_private_ca_that_the_default_refuses(
    serve: Any, private_ca: PrivateCA
) -> None:
    server = serve(lambda h: h.send_bytes(b"private"), private_ca.server_context)
    with pytest.raises(exceptions.DownloadError, match="CERTIFICATE_VERIFY_FAILED"):
        _fetch(AgentFetcher(fast_limits()), f"{server.url}/f")
    fetcher = AgentFetcher(fast_limits(), ca_file=str(private_ca.ca_file))
    assert _fetch(fetcher, f"{server.url}/f") == b"private"


def test_ca_file_in_config_toml_and_an_old_config_without_it(
    world: World, tmp_path: Path, private_ca: PrivateCA, serve: Any
) -> None:
    d = tmp_path / "dev"
    world.enroll(d)
    text = (d / "config.toml").read_text()
    assert 'ca_file = ""' in text
    old = "\n".join(line for line in text.splitlines() if not line.startswith(("ca_file", "proxy")))
    (d / "config.toml").write_text(old + "\n")
    assert config.load(d).ca_file == "" and config.load(d).proxy == ""
    _set_config(d, ca_file=str(private_ca.ca_file))
    assert config.load(d).ca_file == str(private_ca.ca_file)
    tls = serve(lambda h: h.send_bytes(b"agent"), private_ca.server_context)
    assert _fetch(Agent(config.load(d)).fetcher, f"{tls.url}/f") == b"agent"


def test_an_unreadable_ca_file_is_one_line_and_exit_code_3(world: World, tmp_path: Path) -> None:
    d = tmp_path / "dev"
    world.enroll(d)
    _set_config(d, ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(EdgepackError, match=r"missing\.pem: cannot be used as a CA bundle") as info:
        Agent(config.load(d))
    assert info.value.exit_code == 3
    env = {k: v for k, v in os.environ.items() if k != "EDGEPACK_DATA_DIR"}
    run = subprocess.run(
        [sys.executable, "-m", "device_agent", "run", "--once", "--data-dir", str(d), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert run.returncode == 3 and "Traceback" not in run.stderr, run.stderr
    assert "missing.pem" in run.stderr


# -- stalls ----------------------------------------------------------------------------
def test_a_server_dripping_headers_after_a_redirect_hits_the_deadline(serve: Any) -> None:
    dripping = serve(lambda h: h.drip_headers())
    front = serve(_front(dripping.url))
    fetcher = AgentFetcher(fast_limits(read_timeout_s=1.0, response_timeout_s=1.5))
    start = time.monotonic()
    with pytest.raises(exceptions.SlowRetrievalError, match=r"within 1\.5 s"):
        _fetch(fetcher, f"{front.url}/metadata/timestamp.json")
    assert time.monotonic() - start < 4
    assert len(dripping.requests) == 1


def test_a_body_that_stalls_times_out(serve: Any, tmp_path: Path) -> None:
    body = os.urandom(100_000)
    stalled = serve(lambda h: h.stall_body(body))
    front = serve(_front(stalled.url))
    fetcher = AgentFetcher(fast_limits(read_timeout_s=0.5, response_timeout_s=10.0))
    part = tmp_path / "b.part"
    start = time.monotonic()
    with pytest.raises(exceptions.SlowRetrievalError, match="stalled"):
        fetcher.download_resumable(f"{front.url}/b.epk", part, len(body))
    assert part.stat().st_size == 1000, "what arrived stays for the next attempt"
    assert time.monotonic() - start < 4


def test_a_404_behind_a_redirect_is_still_a_404(serve: Any) -> None:
    """ngclient stops looking for the next root version on a 404, redirected or not."""

    def missing(h: _Handler) -> None:
        h.send_response(404)
        h.send_header("Content-Length", "0")
        h.end_headers()

    behind = serve(missing)
    front = serve(_front(behind.url))
    with pytest.raises(exceptions.DownloadHTTPError) as info:
        _fetch(AgentFetcher(fast_limits()), f"{front.url}/metadata/2.root.json")
    assert info.value.status_code == 404
    assert behind.requests == [("/metadata/2.root.json", None)]


def test_an_unreachable_server_is_one_readable_line_naming_the_url() -> None:
    """urllib3 names its connection object in messages; the agent's line names the URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        url = f"http://127.0.0.1:{port}/metadata/timestamp.json"
        with pytest.raises(exceptions.DownloadError) as info:
            _fetch(AgentFetcher(fast_limits()), url)
    message = str(info.value)
    assert message.startswith(f"cannot reach {url}: ") and "Connection refused" in message
    assert "Connection(" not in message and " object at " not in message
    assert exit_code_of(info.value) == 7


def test_enroll_ca_file_and_proxy_are_checked_written_and_kept(
    world: World, tmp_path: Path, private_ca: PrivateCA
) -> None:
    d = tmp_path / "dev"
    bad = run_agent(*_enroll_cli(world, d), "--ca-file", str(tmp_path / "missing.pem"))
    assert bad.returncode == 3 and "missing.pem" in bad.stderr, bad.stderr
    assert not (d / "config.toml").exists()  # refused before anything is written
    bad = run_agent(*_enroll_cli(world, d), "--proxy", "proxy.example:3128")
    assert bad.returncode == 3 and "not an http:// or https:// URL" in bad.stderr, bad.stderr
    assert not (d / "config.toml").exists()
    good = run_agent(
        *_enroll_cli(world, d),
        "--ca-file",
        str(private_ca.ca_file),
        "--proxy",
        "http://127.0.0.1:3128",
    )
    assert good.returncode == 0, good.stderr
    cfg = config.load(d)
    assert (cfg.ca_file, cfg.proxy) == (str(private_ca.ca_file), "http://127.0.0.1:3128")
    again = run_agent(*_enroll_cli(world, d))  # re-enrolling without them keeps them
    assert again.returncode == 0, again.stderr
    assert config.load(d).ca_file == str(private_ca.ca_file)


def _enroll_cli(world: World, data: Path) -> list[str]:
    return [
        "enroll",
        "--repo-url",
        world.server.url,
        "--root",
        str(world.root_json),
        "--model",
        MODEL,
        "--trust",
        str(world.producer_pub),
        "--recipient-key",
        str(world.fleet_key_path),
        "--data-dir",
        str(data),
    ]
