"""The fleet service's HTTP surface: a Starlette app over a fleet store.

Devices send signed reports to ``POST /v1/reports`` (no operator credential: the
report's own signature, checked against the device's registered identity, is its
credential; see :mod:`edgepack.fleet.ingest` for the refusals). Everything else
that reads or changes the fleet needs an operator token, ``Authorization: Bearer
TOKEN`` (401 without one, 403 with a wrong one; a device's signature is no
credential here, so a device key cannot read the fleet):

* ``GET /v1/status?model=&channel=&stale_after=1h&unseen_since=DURATION``
* ``GET /v1/devices``, ``GET /v1/devices/{id}`` (its registration and last report)
* ``POST /v1/devices`` (body: an enrolment record; 201 new, 200 updated)
* ``POST /v1/devices/{id}/revoke`` (body: optional ``{"reason": TEXT}``)
* ``GET /`` the read-only dashboard (:mod:`edgepack.fleet.dashboard`)

``GET /healthz`` needs nothing and says nothing about the fleet. Errors are JSON
``{"error": WORD, "message": TEXT}`` with their status code.

Store calls block (sqlite3, psycopg), so each runs in Starlette's threadpool, on
one store that pools its connections. Given a store *factory*, the app opens the
store on first need and closes it at shutdown.
Tokens are compared as SHA-256 digests with :func:`hmac.compare_digest`, so the
comparison's time says nothing of the token. One access line per request goes to
the ``edgepack.fleet.access`` logger (never the query string: it may hold a token).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TypeVar, cast

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgepack import fleetreport
from edgepack.errors import InvalidInputError
from edgepack.fleet import ingest as ingest_mod
from edgepack.fleet.store import FleetStore, RefusedError, StoreUnavailableError
from edgepack.repo._rollouts import parse_duration

T = TypeVar("T")
StoreSource = FleetStore | Callable[[], FleetStore]

ACCESS_LOG = logging.getLogger("edgepack.fleet.access")
COOKIE_NAME = "edgepack_fleet"
COOKIE_MAX_AGE_S = 12 * 3600
BODY_TIMEOUT_S = 10.0
"""A client that takes longer to send a report's body is cut off (408): slow bodies hold workers."""
DEFAULT_STALE_AFTER_S = 3600.0
_COOKIE_LABEL = b"edgepack-fleet-dashboard-cookie"


class _RefusalError(Exception):
    """An HTTP error answered as ``{"error": reason, "message": text}``."""

    def __init__(
        self, code: int, reason: str, message: str, headers: Mapping[str, str] | None = None
    ):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.headers = dict(headers or {})


class _Stores:
    """Runs blocking store calls in the threadpool.

    The store must be safe to call from several threads at once
    (:class:`edgepack.fleet.sql.SQLStore` keeps a connection pool). A factory is
    called once, on first need, and the store it made is closed at shutdown; a
    store given as such belongs to the caller.
    """

    def __init__(self, source: StoreSource) -> None:
        self._store: FleetStore | None = None
        self._factory: Callable[[], FleetStore] | None = None
        if hasattr(source, "ingest"):
            self._store = cast(FleetStore, source)
        else:
            self._factory = source
        self._lock = threading.Lock()

    def _get(self) -> FleetStore:
        if self._store is None:
            with self._lock:
                if self._store is None:
                    assert self._factory is not None
                    self._store = self._factory()
        return self._store

    async def call(self, fn: Callable[[FleetStore], T]) -> T:
        """``fn(store)`` in a worker thread."""
        return await run_in_threadpool(lambda: fn(self._get()))

    def close(self) -> None:
        """Close the store this app opened (not a store it was given)."""
        with self._lock:
            if self._factory is not None and self._store is not None:
                self._store.close()
                self._store = None


class _Tokens:
    """The operator tokens, held only as digests."""

    def __init__(self, tokens: list[bytes]) -> None:
        tokens = [t.strip() for t in tokens if t.strip()]
        if not tokens:
            raise InvalidInputError(
                "the fleet service needs at least one operator token",
                hint="make one with `edgepack fleet token --out FILE`",
            )
        self._digests = [hashlib.sha256(t).digest() for t in tokens]
        self._cookies = [hmac.new(t, _COOKIE_LABEL, hashlib.sha256).hexdigest() for t in tokens]

    def token_ok(self, presented: str) -> bool:
        """Whether ``presented`` is one of the tokens (every digest compared, no early exit)."""
        digest = hashlib.sha256(presented.strip().encode("utf-8", "surrogateescape")).digest()
        found = False
        for known in self._digests:
            found |= hmac.compare_digest(digest, known)
        return found

    def cookie_for(self, presented: str) -> str:
        """The dashboard cookie's value for a valid token (not the token itself)."""
        return hmac.new(presented.strip().encode(), _COOKIE_LABEL, hashlib.sha256).hexdigest()

    def cookie_ok(self, value: str) -> bool:
        """Whether a dashboard cookie was made from one of the tokens."""
        found = False
        for known in self._cookies:
            found |= hmac.compare_digest(value.encode(), known.encode())
        return found

    def require(self, request: Request) -> None:
        """Refuse a request without a valid ``Authorization: Bearer`` token."""
        header = request.headers.get("authorization")
        if not header:
            raise _RefusalError(
                401,
                "unauthenticated",
                "operator endpoints need Authorization: Bearer TOKEN",
                {"WWW-Authenticate": 'Bearer realm="edgepack-fleet"'},
            )
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise _RefusalError(
                401,
                "unauthenticated",
                "operator endpoints need Authorization: Bearer TOKEN",
                {"WWW-Authenticate": 'Bearer realm="edgepack-fleet"'},
            )
        if not self.token_ok(value):
            raise _RefusalError(403, "forbidden", "the operator token is not valid")


def _error(refusal: _RefusalError) -> JSONResponse:
    return JSONResponse(
        {"error": refusal.reason, "message": refusal.message},
        status_code=refusal.code,
        headers=refusal.headers,
    )


async def _read_body(request: Request, limit: int, timeout_s: float = BODY_TIMEOUT_S) -> bytes:
    """The body, refusing (413) as soon as it passes ``limit``, with or without Content-Length."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise _RefusalError(400, "malformed", "the Content-Length header is not a number")
        if int(length) > limit:
            raise _RefusalError(
                413, "too-large", f"the body is at most {limit} bytes", {"Connection": "close"}
            )
    chunks: list[bytes] = []
    size = 0
    try:
        with anyio.fail_after(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _RefusalError(
                        413,
                        "too-large",
                        f"the body is at most {limit} bytes",
                        {"Connection": "close"},
                    )
                chunks.append(chunk)
    except TimeoutError:
        raise _RefusalError(
            408,
            "timeout",
            f"the body took longer than {timeout_s:g} s",
            {"Connection": "close"},
        ) from None
    return b"".join(chunks)


def _query_duration(request: Request, name: str) -> float | None:
    value = request.query_params.get(name)
    if value is None or value == "":
        return None
    try:
        return parse_duration(value, name)
    except InvalidInputError as exc:
        raise _RefusalError(400, "bad-query", exc.diagnostics()) from None


def make_app(
    store: StoreSource,
    *,
    operator_tokens: list[bytes],
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
    clock: Callable[[], float] = time.time,
    body_timeout_s: float = BODY_TIMEOUT_S,
) -> Starlette:
    """The fleet service over ``store`` (a store, or a factory called once, on first need).

    ``stale_after_s`` is the default bound past which a device's last report
    counts as stale (``?stale_after=`` overrides it per request); ``clock`` gives
    the receive time stamped on reports and the "now" of the status; a report
    whose body takes longer than ``body_timeout_s`` to arrive is refused (408).
    """
    from edgepack.fleet import dashboard, summary

    tokens = _Tokens(operator_tokens)
    stores = _Stores(store)
    identities = ingest_mod.IdentityCache()

    async def status_of(request: Request) -> dict[str, Any]:
        stale = _query_duration(request, "stale_after")
        unseen = _query_duration(request, "unseen_since")
        model = request.query_params.get("model") or None
        channel = request.query_params.get("channel") or None
        now = clock()

        def run(s: FleetStore) -> dict[str, Any]:
            return summary.fleet_status(
                s,
                model=model,
                channel=channel,
                now=now,
                stale_after_s=stale if stale is not None else stale_after_s,
                unseen_since=None if unseen is None else now - unseen,
            )

        return await stores.call(run)

    async def reports(request: Request) -> Response:
        try:
            body = await _read_body(request, fleetreport.MAX_REPORT_BYTES, body_timeout_s)
        except ClientDisconnect:
            request.state.note = "client-disconnected"
            return Response(status_code=400)
        signature = request.headers.get(fleetreport.SIGNATURE_HEADER)
        now = clock()
        try:
            accepted = await stores.call(
                lambda s: ingest_mod.ingest(s, body, signature, now=now, cache=identities)
            )
        except RefusedError as exc:
            raise _RefusalError(exc.code, exc.reason, str(exc)) from None
        request.state.note = accepted.device_id
        return JSONResponse({"accepted": accepted.counter}, status_code=202)

    async def status(request: Request) -> Response:
        tokens.require(request)
        return JSONResponse(await status_of(request))

    async def devices(request: Request) -> Response:
        tokens.require(request)
        found = await stores.call(lambda s: s.devices())
        return JSONResponse({"devices": [ingest_mod.device_view(d) for d in found]})

    async def device(request: Request) -> Response:
        tokens.require(request)
        device_id = request.path_params["device_id"]
        detail = await stores.call(lambda s: ingest_mod.device_detail(s, device_id))
        if detail is None:
            raise _RefusalError(404, "unknown-device", f"{device_id} is not registered")
        return JSONResponse(detail)

    async def register(request: Request) -> Response:
        tokens.require(request)
        body = await _read_body(request, fleetreport.MAX_RECORD_BYTES)
        try:
            record = fleetreport.parse_record(body)
        except InvalidInputError as exc:
            raise _RefusalError(400, "malformed", exc.diagnostics()) from None
        new_device = ingest_mod.device_from_record(record, now=clock())
        try:
            created = await stores.call(lambda s: s.register(new_device))
        except InvalidInputError as exc:
            raise _RefusalError(409, "revoked", exc.diagnostics()) from None
        identities.drop(new_device.device_id)  # its followed models may have changed
        request.state.note = new_device.device_id
        return JSONResponse(
            {"device_id": new_device.device_id, "created": created},
            status_code=201 if created else 200,
        )

    async def revoke(request: Request) -> Response:
        tokens.require(request)
        device_id = request.path_params["device_id"]
        body = await _read_body(request, 4096)
        reason = ""
        if body.strip():
            try:
                doc = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                doc = None
            if not isinstance(doc, dict) or not isinstance(doc.get("reason", ""), str):
                raise _RefusalError(400, "malformed", 'the body must be {"reason": TEXT} or empty')
            reason = fleetreport.cut(doc.get("reason", "")) or ""
        now = clock()
        done = await stores.call(lambda s: s.revoke(device_id, reason, now))
        identities.drop(device_id)
        if not done:
            raise _RefusalError(404, "unknown-device", f"{device_id} is not registered")
        request.state.note = device_id
        return JSONResponse({"device_id": device_id, "revoked": True, "reason": reason})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def home(request: Request) -> Response:
        token = request.query_params.get("token")
        if token is not None:
            # Once, from a link: trade the token for a cookie and drop it from the URL.
            if not tokens.token_ok(token):
                return _dashboard_denied(403, "the operator token is not valid")
            response: Response = RedirectResponse("/", status_code=303)
            response.set_cookie(
                COOKIE_NAME,
                tokens.cookie_for(token),
                max_age=COOKIE_MAX_AGE_S,
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
            )
            _secure_headers(response)
            return response
        cookie = request.cookies.get(COOKIE_NAME)
        if not (cookie and tokens.cookie_ok(cookie)):
            try:
                tokens.require(request)
            except _RefusalError as refusal:
                message = (
                    "the dashboard needs an operator token"
                    if refusal.code == 401
                    else refusal.message
                )
                return _dashboard_denied(refusal.code, message)
        now = clock()
        data = await status_of(request)
        response = HTMLResponse(dashboard.render(data, now=now))
        _secure_headers(response)
        return response

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, _RefusalError)
        request.state.note = exc.reason
        return _error(exc)

    async def unavailable(request: Request, exc: Exception) -> Response:
        request.state.note = "store-unavailable"
        return _error(_RefusalError(503, "store-unavailable", str(exc), {"Retry-After": "5"}))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        word = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        return _error(_RefusalError(exc.status_code, word, str(exc.detail), exc.headers))

    async def bad_input(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, InvalidInputError)
        return _error(_RefusalError(400, "bad-input", exc.diagnostics()))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            stores.close()

    return Starlette(
        routes=[
            Route("/v1/reports", reports, methods=["POST"]),
            Route("/v1/status", status, methods=["GET"]),
            Route("/v1/devices", devices, methods=["GET"]),
            Route("/v1/devices", register, methods=["POST"]),
            Route("/v1/devices/{device_id}", device, methods=["GET"]),
            Route("/v1/devices/{device_id}/revoke", revoke, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/", home, methods=["GET"]),
        ],
        exception_handlers={
            _RefusalError: refused,
            StoreUnavailableError: unavailable,
            InvalidInputError: bad_input,
            HTTPException: http_error,
        },
        middleware=[Middleware(_AccessLog)],
        lifespan=lifespan,
    )


def _secure_headers(response: Response) -> None:
    """The dashboard loads nothing from anywhere and runs no script."""
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    )
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"


def _dashboard_denied(code: int, message: str) -> Response:
    from edgepack.fleet import dashboard

    response = HTMLResponse(dashboard.render_denied(message), status_code=code)
    if code == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="edgepack-fleet"'
    _secure_headers(response)
    return response


class _AccessLog:
    """One line per request: client, method, path (no query), status, time, and a note."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            client = scope.get("client") or ("-", 0)
            note = getattr(scope.get("state", {}), "get", lambda _k, _d=None: None)("note")
            ACCESS_LOG.info(
                '%s "%s %s" %s %.1fms%s',
                client[0],
                scope.get("method", "-"),
                scope.get("path", "-"),
                status or "-",
                (time.perf_counter() - start) * 1000,
                f" {note}" if note else "",
            )
