"""The fleet store on SQL: SQLite (the embedded default) and PostgreSQL (production).

One class holds every query, written once with ``?`` placeholders (PostgreSQL's
``%s`` are substituted); the two dialects differ only in how a connection is
opened, how a write transaction begins and which exceptions mean "the database
failed". Every call runs in one transaction on a connection taken from a small
pool (so the service's threadpool can call from many threads at once) and any
database failure becomes :class:`StoreUnavailableError` with nothing half-stored.

A pooled PostgreSQL connection found dead (the server restarted) is dropped with
every other idle one, and the call runs once more on a fresh connection: after an
outage the first call works again, and during one every call fails fast.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from edgepack.errors import InvalidInputError
from edgepack.fleet import migrations
from edgepack.fleet.store import (
    Decision,
    Device,
    ModelState,
    RefusedError,
    StoreUnavailableError,
)

T = TypeVar("T")

BUSY_TIMEOUT_S = 10.0
"""How long a SQLite writer waits for another's lock before the store gives up."""
CONNECT_TIMEOUT_S = 5
"""PostgreSQL connect timeout unless the URL sets ``connect_timeout``."""
MAX_IDLE = 8
"""Idle connections the pool keeps; more are opened on demand and closed after."""

URL_HINT = (
    "write sqlite:///relative/path.db, sqlite:////absolute/path.db or "
    "postgresql://USER@HOST:PORT/DATABASE"
)

_DEVICE_COLUMNS = (
    "device_id, identity, recipient, models, channel, cohort, profile, architecture, "
    "registered_at, revoked_at, revoked_reason, last_counter, last_seen"
)
_STATE_COLUMNS = (
    "device_id, model, channel, version, revision, state, last_action, last_error, "
    "refused, pending, health_latency_ms, stale, monitoring, reported_at"
)
_STATE_ON_CONFLICT = (
    "ON CONFLICT (device_id, model) DO UPDATE SET channel = excluded.channel, "
    "version = excluded.version, revision = excluded.revision, state = excluded.state, "
    "last_action = excluded.last_action, last_error = excluded.last_error, "
    "refused = excluded.refused, pending = excluded.pending, "
    "health_latency_ms = excluded.health_latency_ms, stale = excluded.stale, "
    "monitoring = excluded.monitoring, reported_at = excluded.reported_at"
)
_STATE_UPSERT = (
    f"INSERT INTO model_states ({_STATE_COLUMNS}) "  # noqa: S608 - constant columns
    f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) {_STATE_ON_CONFLICT}"
)
_DECISION_COLUMNS = "model, channel, version, action, step, reason, decided_at, details"


def _clean(value: object) -> str | None:
    """``value`` as text either database stores: no NUL (PostgreSQL refuses it in TEXT)
    and no lone surrogate (neither driver can encode one); None stays None."""
    if value is None:
        return None
    text = str(value)
    if text.isascii() and "\x00" not in text:
        return text
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")


def _monitoring_text(monitoring: object) -> str | None:
    """A model's monitoring entry (checked by parse_report) as the JSON text stored: ASCII
    (escapes, so no NUL or lone surrogate reaches either database), None when absent."""
    if monitoring is None:
        return None
    return json.dumps(monitoring, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


class SQLStore:
    """A :class:`~edgepack.fleet.store.FleetStore` on a DB-API database (see the module)."""

    dialect: migrations.Dialect = "sqlite"

    def __init__(
        self,
        url: str,
        where: str,
        connect: Callable[[], Any],
        errors: tuple[type[BaseException], ...],
    ) -> None:
        self.url = url
        self._where = where
        self._connect = connect
        self._errors = errors
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False
        self._queries: dict[str, str] = {}

    # -- connections and transactions -------------------------------------------------

    def _q(self, sql: str) -> str:
        """``sql`` with this dialect's placeholders."""
        if self.dialect == "sqlite":
            return sql
        found = self._queries.get(sql)
        if found is None:
            found = self._queries[sql] = sql.replace("?", "%s")
        return found

    def _unavailable(self, exc: BaseException) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"the fleet database {self._where} is unavailable ({_first_line(exc)}); "
            "nothing was stored",
            hint="check that the database is up and reachable, then try again",
        )

    def _take(self) -> tuple[Any, bool]:
        """A connection and whether it came from the pool (it may have died idle)."""
        with self._lock:
            if self._closed:
                raise StoreUnavailableError(f"the fleet store {self._where} is closed")
            if self._idle:
                return self._idle.pop(), True
        try:
            return self._connect(), False
        except self._errors as exc:
            raise self._unavailable(exc) from exc

    def _give(self, connection: Any) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < MAX_IDLE:
                self._idle.append(connection)
                return
        self._close_quietly(connection)

    def _close_quietly(self, connection: Any) -> None:
        with contextlib.suppress(*self._errors):
            connection.close()

    def _drop_idle(self) -> None:
        """Close every idle connection: after one failed, the others likely did too."""
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            self._close_quietly(connection)

    def _broken(self, connection: Any) -> bool:
        """Whether ``connection`` lost its server (never, for an embedded database)."""
        return False

    def _begin(self, cursor: Any, write: bool) -> None:
        """Open the transaction (PostgreSQL opens one implicitly)."""

    def _with_connection(
        self, work: Callable[[Any], T], retry_safe: Callable[[], bool] = lambda: True
    ) -> T:
        """``work(connection)``, mapping database failures; once more on a fresh
        connection when a pooled one was found dead and ``retry_safe()`` says that
        nothing can have been committed (the failure came before the commit)."""
        for attempt in (1, 2):
            connection, pooled = self._take()
            try:
                result = work(connection)
            except self._errors as exc:
                broken = self._broken(connection)
                self._close_quietly(connection)
                self._drop_idle()
                if attempt == 1 and pooled and broken and retry_safe():
                    continue
                raise self._unavailable(exc) from exc
            except BaseException:
                try:
                    connection.rollback()
                except self._errors:
                    self._close_quietly(connection)
                else:
                    self._give(connection)
                raise
            self._give(connection)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _run(self, work: Callable[[Any], T], *, write: bool) -> T:
        """``work(cursor)`` in one transaction, committed before this returns.

        A link lost during the commit is not retried: the commit may have happened,
        and the caller learns StoreUnavailableError (an ingest retried by the device
        then meets its own counter: 409, already kept).
        """
        committing = False

        def transaction(connection: Any) -> T:
            nonlocal committing
            cursor = connection.cursor()
            try:
                self._begin(cursor, write)
                result = work(cursor)
            finally:
                cursor.close()
            committing = True
            connection.commit()
            return result

        return self._with_connection(transaction, lambda: not committing)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run ``sql`` (``?`` placeholders) for every row, in one transaction.

        For bulk loads (tests, benchmarks); the store's own writes use the methods.
        """
        batch = list(rows)
        self._run(lambda cursor: cursor.executemany(self._q(sql), batch), write=True)

    # -- the FleetStore interface -----------------------------------------------------

    def migrate(self, target: int | None = None) -> int:
        """Bring the schema to the newest version (or ``target``); return it (idempotent)."""
        return self._with_connection(
            lambda connection: migrations.migrate(connection, self.dialect, target=target)
        )

    def schema(self) -> list[tuple[int, str]]:
        """The migrations applied to this database, oldest first."""
        return self._run(
            lambda cursor: [
                (int(v), str(d))
                for v, d in cursor.execute(
                    "SELECT version, description FROM schema_version ORDER BY version"
                ).fetchall()
            ],
            write=False,
        )

    def register(self, device: Device) -> bool:
        """Add a device (True) or update a registered one's record, keeping its counter
        (False). A revoked device stays revoked: raises InvalidInputError."""
        record = (
            _clean(device.identity.hex()),
            _clean(device.recipient),
            json.dumps([_clean(m) for m in device.models]),
            _clean(device.channel),
            _clean(device.cohort),
            _clean(device.profile),
            _clean(device.architecture),
        )
        device_id = _clean(device.device_id)

        def work(cursor: Any) -> bool | None:
            cursor.execute(
                self._q(
                    "INSERT INTO devices (identity, recipient, models, channel, cohort, profile, "
                    "architecture, device_id, registered_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (device_id) DO NOTHING"
                ),
                (*record, device_id, device.registered_at),
            )
            if cursor.rowcount == 1:
                return True
            cursor.execute(
                self._q(
                    "UPDATE devices SET identity = ?, recipient = ?, models = ?, channel = ?, "
                    "cohort = ?, profile = ?, architecture = ? "
                    "WHERE device_id = ? AND revoked_at IS NULL"
                ),
                (*record, device_id),
            )
            return False if cursor.rowcount == 1 else None

        added = self._run(work, write=True)
        if added is None:
            raise InvalidInputError(
                f"device {device.device_id} is revoked",
                hint="a revoked device stays revoked; enrol it again to give it a new identity",
            )
        return added

    def revoke(self, device_id: str, reason: str, at: float) -> bool:
        """Mark a device revoked (its reports are refused from now on); False if unknown.

        Revoking a revoked device keeps the first revocation's time and reason.
        """

        def work(cursor: Any) -> bool:
            cursor.execute(
                self._q(
                    "UPDATE devices SET revoked_at = ?, revoked_reason = ? "
                    "WHERE device_id = ? AND revoked_at IS NULL"
                ),
                (at, _clean(reason), device_id),
            )
            if cursor.rowcount == 1:
                return True
            cursor.execute(self._q("SELECT 1 FROM devices WHERE device_id = ?"), (device_id,))
            return cursor.fetchone() is not None

        return self._run(work, write=True)

    @staticmethod
    def _device(row: Sequence[Any], models: dict[str, tuple[str, ...]]) -> Device:
        listed = models.get(row[3])
        if listed is None:
            listed = models[row[3]] = tuple(json.loads(row[3]))
        return Device(
            device_id=row[0],
            identity=bytes.fromhex(row[1]),
            recipient=row[2],
            models=listed,
            channel=row[4],
            cohort=row[5],
            profile=row[6],
            architecture=row[7],
            registered_at=float(row[8]),
            revoked_at=None if row[9] is None else float(row[9]),
            revoked_reason=row[10],
            last_counter=int(row[11]),
            last_seen=None if row[12] is None else float(row[12]),
        )

    def device(self, device_id: str) -> Device | None:
        """One device, or None."""

        def work(cursor: Any) -> Device | None:
            cursor.execute(
                self._q(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = ?"),  # noqa: S608 - constant columns
                (device_id,),
            )
            row = cursor.fetchone()
            return None if row is None else self._device(row, {})

        return self._run(work, write=False)

    def devices(self) -> list[Device]:
        """Every registered device, by id."""

        def work(cursor: Any) -> list[Device]:
            cursor.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY device_id")  # noqa: S608 - constant columns
            models: dict[str, tuple[str, ...]] = {}
            return [self._device(row, models) for row in cursor.fetchall()]

        return self._run(work, write=False)

    def ingest(
        self, device_id: str, counter: int, received_at: float, report: dict[str, Any], raw: bytes
    ) -> None:
        """Store a verified report in one transaction (see the interface); its model
        states replace the device's previous ones, stamped with ``received_at`` (the
        service's clock: a device's own may be wrong, e.g. a board without a real-time
        clock before NTP)."""
        if isinstance(counter, bool) or not isinstance(counter, int) or not 0 < counter < 2**63:
            raise InvalidInputError("a report's counter must be a positive 64-bit integer")
        body = _clean(raw.decode("utf-8", "replace"))
        models = report.get("models") or {}
        states = [
            (
                device_id,
                _clean(name),
                _clean(entry.get("channel")) or "",
                _clean(entry.get("version")),
                _clean(entry.get("revision")),
                _clean(entry.get("state")),
                _clean(entry.get("last_action")),
                _clean(entry.get("last_error")),
                json.dumps(
                    {_clean(v): _clean(why) for v, why in (entry.get("refused") or {}).items()},
                    sort_keys=True,
                ),
                _clean(entry.get("pending")),
                entry.get("health_latency_ms"),
                1 if entry.get("stale") else 0,
                _monitoring_text(entry.get("monitoring")),
                received_at,
            )
            for name, entry in models.items()
        ]

        def work(cursor: Any) -> None:
            if not self._write_report(cursor, device_id, counter, received_at, body, states):
                raise self._refusal(cursor, device_id, counter)

        self._run(work, write=True)

    def _write_report(
        self,
        cursor: Any,
        device_id: str,
        counter: int,
        received_at: float,
        body: str | None,
        states: list[tuple[Any, ...]],
    ) -> bool:
        """The writes of one ingest, in the caller's transaction; False (nothing written)
        when the device is unknown, revoked or the counter not newer."""
        cursor.execute(
            self._q(
                "UPDATE devices SET last_counter = ?, last_seen = ?, last_report = ? "
                "WHERE device_id = ? AND revoked_at IS NULL AND last_counter < ?"
            ),
            (counter, received_at, body, device_id, counter),
        )
        if cursor.rowcount != 1:
            return False
        cursor.execute(
            self._q(
                "INSERT INTO reports (device_id, counter, received_at, body) VALUES (?, ?, ?, ?)"
            ),
            (device_id, counter, received_at, body),
        )
        names = [row[1] for row in states]
        keep = f" AND model NOT IN ({', '.join('?' * len(names))})" if names else ""
        cursor.execute(
            self._q(f"DELETE FROM model_states WHERE device_id = ?{keep}"),  # noqa: S608 - placeholders only
            (device_id, *names),
        )
        if states:
            cursor.executemany(self._q(_STATE_UPSERT), states)
        return True

    def _refusal(self, cursor: Any, device_id: str, counter: int) -> RefusedError:
        """Why the conditional update touched no row, read in the same transaction."""
        cursor.execute(
            self._q("SELECT revoked_at, last_counter FROM devices WHERE device_id = ?"),
            (device_id,),
        )
        row = cursor.fetchone()
        if row is None:
            return RefusedError(403, "unregistered", f"device {device_id} is not registered")
        if row[0] is not None:
            return RefusedError(403, "revoked", f"device {device_id} is revoked")
        return RefusedError(
            409,
            "replayed",
            f"report {counter} of device {device_id} is not newer than its last ({row[1]})",
        )

    def states(self, model: str | None = None, channel: str | None = None) -> list[ModelState]:
        """The last reported state of every (device, model), filtered, by device and model."""
        where, args = [], []
        if model is not None:
            where.append("model = ?")
            args.append(model)
        if channel is not None:
            where.append("channel = ?")
            args.append(channel)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        sql = self._q(
            f"SELECT {_STATE_COLUMNS} FROM model_states{clause} ORDER BY device_id, model"  # noqa: S608 - placeholders only
        )

        def work(cursor: Any) -> list[ModelState]:
            cursor.execute(sql, args)
            loads = json.loads
            return [
                ModelState(
                    r[0],
                    r[1],
                    r[2],
                    r[3],
                    r[4],
                    r[5],
                    r[6],
                    r[7],
                    {} if r[8] == "{}" else loads(r[8]),
                    r[9],
                    r[10],
                    bool(r[11]),
                    r[13],
                    None if r[12] is None else loads(r[12]),
                )
                for r in cursor.fetchall()
            ]

        return self._run(work, write=False)

    def status_rows(
        self, model: str | None = None, channel: str | None = None
    ) -> list[tuple[Any, ...]]:
        """Devices joined with their matching states (see the interface's STATUS_COLUMNS)."""
        on, args = [], []
        if model is not None:
            on.append(" AND s.model = ?")
            args.append(model)
        if channel is not None:
            on.append(" AND s.channel = ?")
            args.append(channel)
        sql = self._q(
            # A device's registration is only needed when it has no matching state.
            "SELECT d.device_id, CASE WHEN s.model IS NULL THEN d.models END, "  # noqa: S608 - placeholders only
            "CASE WHEN s.model IS NULL THEN d.channel END, d.last_seen, d.revoked_at, s.model, "
            "s.channel, s.version, s.pending, s.state, s.last_action, s.last_error, s.refused, "
            "s.stale, s.reported_at, s.revision, s.monitoring FROM devices d "
            "LEFT JOIN model_states s "
            f"ON s.device_id = d.device_id{''.join(on)} ORDER BY d.device_id"
        )

        def work(cursor: Any) -> list[tuple[Any, ...]]:
            cursor.execute(sql, args)
            rows: list[tuple[Any, ...]] = cursor.fetchall()
            return rows

        return self._run(work, write=False)

    def last_report(self, device_id: str) -> dict[str, Any] | None:
        """The device's last stored report document, or None."""

        def work(cursor: Any) -> str | None:
            cursor.execute(
                self._q("SELECT last_report FROM devices WHERE device_id = ?"), (device_id,)
            )
            row = cursor.fetchone()
            return None if row is None else row[0]

        body = self._run(work, write=False)
        if body is None:
            return None
        document: dict[str, Any] = json.loads(body)
        return document

    def claim(self, decision: Decision) -> bool:
        """Record a decision; False when an equal one (same key) is already recorded."""
        row = (
            _clean(decision.model),
            _clean(decision.channel),
            _clean(decision.version),
            _clean(decision.action),
            float(decision.step),
            _clean(decision.reason),
            decision.decided_at,
            json.dumps(decision.details, sort_keys=True, default=str),
        )

        def work(cursor: Any) -> bool:
            cursor.execute(
                self._q(
                    f"INSERT INTO decisions ({_DECISION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "  # noqa: S608 - constant columns
                    "ON CONFLICT (model, channel, version, action, step) DO NOTHING"
                ),
                row,
            )
            return bool(cursor.rowcount == 1)

        return self._run(work, write=True)

    def decisions(self, model: str | None = None) -> list[Decision]:
        """Every recorded decision (of ``model``), oldest first."""
        clause = " WHERE model = ?" if model is not None else ""
        sql = self._q(f"SELECT {_DECISION_COLUMNS} FROM decisions{clause} ORDER BY decided_at, id")  # noqa: S608 - placeholders only

        def work(cursor: Any) -> list[Decision]:
            cursor.execute(sql, () if model is None else (model,))
            return [
                Decision(r[0], r[1], r[2], r[3], float(r[4]), r[5], float(r[6]), json.loads(r[7]))
                for r in cursor.fetchall()
            ]

        return self._run(work, write=False)

    def close(self) -> None:
        """Close every connection; later calls raise StoreUnavailableError."""
        with self._lock:
            self._closed = True
        self._drop_idle()


def _wal(connection: sqlite3.Connection) -> None:
    """Put the file in WAL mode (it stays so). Switching takes the file's exclusive lock
    and SQLite does not wait on the busy timeout for it, so two first opens at once
    would fail: retry until the timeout instead."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            if connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                return
            connection.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class SQLiteStore(SQLStore):
    """The store in one SQLite file: WAL (readers never block the writer), a busy
    timeout, ``BEGIN IMMEDIATE`` for writes so two writers queue instead of failing,
    and ``synchronous=FULL`` so an acknowledged report survives a power cut."""

    dialect: migrations.Dialect = "sqlite"

    def __init__(self, url: str, path: Path) -> None:
        self.path = path

        def connect() -> sqlite3.Connection:
            connection = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            try:
                connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
                _wal(connection)
                connection.execute("PRAGMA synchronous = FULL")
                connection.execute("PRAGMA foreign_keys = ON")
            except sqlite3.Error:
                connection.close()
                raise
            return connection

        super().__init__(url, str(path), connect, (sqlite3.Error,))

    def _begin(self, cursor: Any, write: bool) -> None:
        # IMMEDIATE takes the write lock up front: two ingests of one counter queue on
        # it, and the second sees the first's counter (never a deadlock on upgrade).
        cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")


_PG_STATE_TYPES = {
    "model": "text",
    "channel": "text",
    "version": "text",
    "revision": "text",
    "state": "text",
    "last_action": "text",
    "last_error": "text",
    "refused": "text",
    "pending": "text",
    "health_latency_ms": "float8",
    "stale": "int4",
    "monitoring": "text",
}
_PG_INGEST = (
    # Data-modifying CTEs: every part or none, gated on the conditional update.
    "WITH upd AS (UPDATE devices SET last_counter = %(counter)s, last_seen = %(at)s, "  # noqa: S608 - constant columns
    "last_report = %(body)s WHERE device_id = %(id)s AND revoked_at IS NULL "
    "AND last_counter < %(counter)s RETURNING device_id), "
    "rep AS (INSERT INTO reports (device_id, counter, received_at, body) "
    "SELECT device_id, %(counter)s, %(at)s, %(body)s FROM upd), "
    "gone AS (DELETE FROM model_states WHERE device_id IN (SELECT device_id FROM upd) "
    "AND NOT (model = ANY(%(models)s::text[]))), "
    f"st AS (INSERT INTO model_states ({_STATE_COLUMNS}) "
    f"SELECT upd.device_id, {', '.join('s.' + c for c in _PG_STATE_TYPES)}, %(at)s "
    "FROM upd, json_to_recordset(%(states)s::json) AS s("
    + ", ".join(f"{c} {t}" for c, t in _PG_STATE_TYPES.items())
    + ") "
    + _STATE_ON_CONFLICT
    + ") SELECT count(*) FROM upd"
)


class PostgresStore(SQLStore):
    """The store in a PostgreSQL database, through psycopg 3 (READ COMMITTED: a
    second ingest of one counter waits on the device's row, then finds it taken)."""

    dialect: migrations.Dialect = "postgresql"

    def __init__(self, url: str) -> None:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        try:
            params = conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise InvalidInputError(
                f"cannot read the PostgreSQL URL: {_first_line(exc)}", hint=URL_HINT
            ) from None
        port = str(params.get("port", "5432"))
        if not all(part.isdigit() for part in port.split(",")):
            raise InvalidInputError(
                f"the PostgreSQL URL's port {port!r} is not a number", hint=URL_HINT
            )
        extra: dict[str, Any] = {"application_name": "edgepack-fleet"}
        if "connect_timeout" not in params:
            extra["connect_timeout"] = CONNECT_TIMEOUT_S
        where = "postgresql://{}:{}/{}".format(
            params.get("host", "localhost"), port, params.get("dbname", "")
        )

        def connect() -> Any:
            return psycopg.connect(url, autocommit=False, **extra)

        super().__init__(url, where, connect, (psycopg.Error,))

    def _broken(self, connection: Any) -> bool:
        return bool(connection.broken or connection.closed)

    def _write_report(
        self,
        cursor: Any,
        device_id: str,
        counter: int,
        received_at: float,
        body: str | None,
        states: list[tuple[Any, ...]],
    ) -> bool:
        """One statement for all the writes (one round trip, not four: the ingest rate
        over a network is bound by round trips), the states passed as one JSON array."""
        names = list(_PG_STATE_TYPES)
        cursor.execute(
            _PG_INGEST,
            {
                "id": device_id,
                "counter": counter,
                "at": received_at,
                "body": body,
                "models": [row[1] for row in states],
                "states": json.dumps([dict(zip(names, row[1:-1], strict=True)) for row in states]),
            },
        )
        return bool(cursor.fetchone()[0] == 1)


def open_store(url: str, *, migrate: bool = True) -> SQLStore:
    """The fleet store at ``url``, its schema brought up to date unless ``migrate`` is off.

    ``sqlite:///relative/path``, ``sqlite:////absolute/path`` or ``postgresql://…``
    (also ``postgres://``); anything else is InvalidInputError with the forms to use.
    """
    if not isinstance(url, str) or not url:
        raise InvalidInputError("no fleet store URL given", hint=URL_HINT)
    scheme = url.partition(":")[0].lower()
    store: SQLStore
    if scheme == "sqlite":
        if not url.startswith("sqlite:///") or len(url) == len("sqlite:///"):
            raise InvalidInputError(f"cannot read the SQLite URL {url!r}", hint=URL_HINT)
        path = Path(url[len("sqlite:///") :])
        if str(path) == ":memory:" or url.endswith("/"):
            raise InvalidInputError(
                f"the SQLite URL {url!r} names no file", hint="give the path of a database file"
            )
        if not path.parent.is_dir():
            raise InvalidInputError(
                f"the folder of the fleet database {path} does not exist",
                hint="create it, or give a path in an existing folder",
            )
        if path.is_dir():
            raise InvalidInputError(f"the fleet database {path} is a folder", hint=URL_HINT)
        store = SQLiteStore(url, path)
    elif scheme in ("postgresql", "postgres"):
        store = PostgresStore(url)
    else:
        raise InvalidInputError(f"unknown fleet store URL {url!r}", hint=URL_HINT)
    if migrate:
        try:
            store.migrate()
        except BaseException:
            store.close()
            raise
    return store
