"""The fleet store's schema, as an ordered list of versioned migrations.

Each migration is ``(version, description, statements)``; a statement is either
one SQL text both dialects accept or a ``{dialect: text}`` map where they differ.
:func:`migrate` applies, in one transaction, every migration newer than the
database's ``schema_version`` and records each one, so it is idempotent and a
half-applied schema never exists. Two processes migrating at once serialise:
PostgreSQL on a transaction-scoped advisory lock taken before anything else,
SQLite on ``BEGIN IMMEDIATE`` (the write lock of the whole file).

Types are chosen to mean the same in both dialects: TEXT, BIGINT, DOUBLE
PRECISION (SQLite reads it as REAL), INTEGER 0/1 for booleans, JSON as TEXT.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Literal

from edgepack.errors import InvalidInputError

Dialect = Literal["sqlite", "postgresql"]
Statement = str | dict[str, str]

ADVISORY_LOCK_KEY = 0x6564_6765_7061_636B % 2**63
"""``pg_advisory_xact_lock`` key of edgepack's migrations ("edgepack" in ASCII)."""

MIGRATIONS: list[tuple[int, str, list[Statement]]] = [
    (
        1,
        "devices, reports, model states and rollout decisions",
        [
            """CREATE TABLE devices (
                device_id TEXT PRIMARY KEY,
                identity TEXT NOT NULL,
                recipient TEXT NOT NULL,
                models TEXT NOT NULL,
                channel TEXT NOT NULL,
                cohort TEXT NOT NULL,
                profile TEXT NOT NULL,
                architecture TEXT NOT NULL,
                registered_at DOUBLE PRECISION NOT NULL,
                revoked_at DOUBLE PRECISION,
                revoked_reason TEXT NOT NULL DEFAULT '',
                last_counter BIGINT NOT NULL DEFAULT 0,
                last_seen DOUBLE PRECISION,
                last_report TEXT
            )""",
            """CREATE TABLE reports (
                device_id TEXT NOT NULL REFERENCES devices (device_id),
                counter BIGINT NOT NULL,
                received_at DOUBLE PRECISION NOT NULL,
                body TEXT NOT NULL,
                PRIMARY KEY (device_id, counter)
            )""",
            """CREATE TABLE model_states (
                device_id TEXT NOT NULL REFERENCES devices (device_id),
                model TEXT NOT NULL,
                channel TEXT NOT NULL,
                version TEXT,
                revision TEXT,
                state TEXT,
                last_action TEXT,
                last_error TEXT,
                refused TEXT NOT NULL DEFAULT '{}',
                pending TEXT,
                health_latency_ms DOUBLE PRECISION,
                stale INTEGER NOT NULL DEFAULT 0,
                reported_at DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (device_id, model)
            )""",
            {
                "sqlite": """CREATE TABLE decisions (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    model TEXT NOT NULL,
                    channel TEXT NOT NULL,
                    version TEXT NOT NULL,
                    action TEXT NOT NULL,
                    step DOUBLE PRECISION NOT NULL,
                    reason TEXT NOT NULL,
                    decided_at DOUBLE PRECISION NOT NULL,
                    details TEXT NOT NULL DEFAULT '{}',
                    UNIQUE (model, channel, version, action, step)
                )""",
                "postgresql": """CREATE TABLE decisions (
                    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                    model TEXT NOT NULL,
                    channel TEXT NOT NULL,
                    version TEXT NOT NULL,
                    action TEXT NOT NULL,
                    step DOUBLE PRECISION NOT NULL,
                    reason TEXT NOT NULL,
                    decided_at DOUBLE PRECISION NOT NULL,
                    details TEXT NOT NULL DEFAULT '{}',
                    UNIQUE (model, channel, version, action, step)
                )""",
            },
        ],
    ),
    (
        2,
        "indexes for fleet status: states by model and channel, devices by last report",
        [
            "CREATE INDEX model_states_by_release ON model_states (model, channel, version)",
            "CREATE INDEX devices_by_last_seen ON devices (last_seen)",
            "CREATE INDEX decisions_by_model ON decisions (model, decided_at)",
        ],
    ),
    (
        3,
        "model states carry the model's monitoring figures (JSON, null when not reported)",
        ["ALTER TABLE model_states ADD COLUMN monitoring TEXT"],
    ),
]

LATEST = MIGRATIONS[-1][0]

_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at DOUBLE PRECISION NOT NULL
)"""


def statement_for(statement: Statement, dialect: Dialect) -> str:
    """The SQL text of ``statement`` in ``dialect``."""
    return statement if isinstance(statement, str) else statement[dialect]


def migrate(connection: Any, dialect: Dialect, *, target: int | None = None) -> int:
    """Apply every migration up to ``target`` (default: the newest); return the version.

    ``connection`` is an open sqlite3 connection in autocommit mode
    (``isolation_level=None``) or a psycopg connection; the caller maps database
    errors. A database newer than this code is refused rather than touched.
    """
    target = LATEST if target is None else target
    mark = "?" if dialect == "sqlite" else "%s"
    cursor = connection.cursor()
    try:
        if dialect == "sqlite":
            cursor.execute("BEGIN IMMEDIATE")
        else:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_KEY,))
        cursor.execute(_VERSION_TABLE)
        cursor.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version")
        current = int(cursor.fetchone()[0])
        if current > LATEST:
            raise InvalidInputError(
                f"the fleet database is at schema version {current}, newer than this "
                f"edgepack knows ({LATEST})",
                hint="upgrade edgepack on this host before using that database",
            )
        for version, description, statements in MIGRATIONS:
            if current < version <= target:
                for statement in statements:
                    cursor.execute(statement_for(statement, dialect))
                cursor.execute(
                    f"INSERT INTO schema_version (version, description, applied_at) "  # noqa: S608 - placeholders only
                    f"VALUES ({mark}, {mark}, {mark})",
                    (version, description, time.time()),
                )
                current = version
        connection.commit()
    except BaseException:
        # The original error is the one to report; a broken link fails rollback too.
        with contextlib.suppress(Exception):
            connection.rollback()
        raise
    finally:
        with contextlib.suppress(Exception):
            cursor.close()
    return current


def applied(connection: Any) -> list[tuple[int, str]]:
    """The migrations recorded in the database, oldest first (empty before the first)."""
    cursor = connection.cursor()
    try:
        cursor.execute("SELECT version, description FROM schema_version ORDER BY version")
        return [(int(v), str(d)) for v, d in cursor.fetchall()]
    finally:
        cursor.close()
