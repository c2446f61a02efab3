"""The fleet store on both backends (SQLite and a real PostgreSQL server): migrations,
registration, ingest and its refusals, concurrency, and faults of the database itself."""

from __future__ import annotations

import functools
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from edgepack import fleetreport
from edgepack.errors import EdgepackError, InvalidInputError
from edgepack.fleet import migrations
from edgepack.fleet.sql import SQLStore, open_store
from edgepack.fleet.store import Decision, RefusedError, StoreUnavailableError
from tests import pg
from tests.fleet._reports import Unit, entry
from tests.servers import free_port


def query(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` (``?`` placeholders) read straight from the database, not the store."""
    if url.startswith("sqlite:"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as connection:
            return connection.execute(sql, args).fetchall()
    with psycopg.connect(url) as connection:
        return connection.execute(sql.replace("?", "%s"), args).fetchall()


def counters(url: str, device_id: str) -> list[int]:
    """The counters of the reports of ``device_id`` kept in the reports table."""
    rows = query(url, "SELECT counter FROM reports WHERE device_id = ? ORDER BY counter", device_id)
    return [int(r[0]) for r in rows]


@pytest.fixture
def unit(store: SQLStore) -> Unit:
    """A registered device."""
    device = Unit()
    assert store.register(device.device())
    return device


def in_threads(n: int, work: Callable[[int], Any]) -> list[Any]:
    """``work(i)`` in ``n`` threads released together; each one's result or exception."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


# -- migrations ---------------------------------------------------------------------------


def test_migrations_are_versioned_and_idempotent(store_url: str) -> None:
    store = open_store(store_url, migrate=False)
    try:
        assert store.migrate(target=1) == 1
        assert [v for v, _ in store.schema()] == [1]
        assert store.migrate() == migrations.LATEST
        assert store.migrate() == migrations.LATEST
        assert store.schema() == [(v, d) for v, d, _ in migrations.MIGRATIONS]
    finally:
        store.close()
    again = open_store(store_url)  # opening migrates: a no-op now
    again.close()
    assert [r[0] for r in query(store_url, "SELECT version FROM schema_version")] == list(
        range(1, migrations.LATEST + 1)
    )


def test_two_processes_migrating_at_once_apply_each_version_once(store_url: str) -> None:
    stores = [open_store(store_url, migrate=False) for _ in range(4)]
    try:
        results = in_threads(4, lambda i: stores[i].migrate())
    finally:
        for s in stores:
            s.close()
    assert results == [migrations.LATEST] * 4
    rows = query(store_url, "SELECT version FROM schema_version ORDER BY version")
    assert [r[0] for r in rows] == list(range(1, migrations.LATEST + 1))


def test_a_database_newer_than_the_code_is_refused_untouched(store_url: str) -> None:
    open_store(store_url).close()
    query_write(store_url, "INSERT INTO schema_version VALUES (99, 'from the future', 0)")
    with pytest.raises(InvalidInputError, match="schema version 99"):
        open_store(store_url)


def query_write(url: str, sql: str) -> None:
    """Run one statement straight on the database and commit it."""
    if url.startswith("sqlite:"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as connection:
            connection.execute(sql)
        return
    with psycopg.connect(url) as connection:
        connection.execute(sql)


# -- registration -------------------------------------------------------------------------


def test_register_reregister_and_revoke(store: SQLStore) -> None:
    a, b = Unit(), Unit(models=("detector", "classifier"))
    assert store.register(a.device(at=100.0))
    assert store.register(b.device())
    got = store.device(a.device_id)
    assert got is not None
    assert got == a.device(at=100.0)
    assert got.identity == a.device().identity and got.last_seen is None
    assert [d.device_id for d in store.devices()] == sorted([a.device_id, b.device_id])

    a.send(store, 5, at=200.0)
    assert not store.register(a.device(cohort="canary", at=300.0))  # an update, not a new one
    got = store.device(a.device_id)
    assert got is not None
    assert (got.cohort, got.last_counter, got.last_seen, got.registered_at) == (
        "canary",
        5,
        200.0,
        100.0,
    )

    assert store.revoke(a.device_id, "stolen", 400.0)
    assert store.revoke(a.device_id, "again", 500.0)
    got = store.device(a.device_id)
    assert got is not None
    assert (got.revoked_at, got.revoked_reason) == (400.0, "stolen")
    assert not store.revoke("dev-" + "0" * 20, "unknown", 1.0)
    assert store.device("dev-" + "0" * 20) is None
    with pytest.raises(InvalidInputError, match="is revoked"):
        store.register(a.device())
    got = store.device(a.device_id)
    assert got is not None and got.revoked_at == 400.0


# -- ingest -------------------------------------------------------------------------------


def test_an_accepted_report_is_stored_with_its_states(store: SQLStore, store_url: str) -> None:
    u = Unit(models=("detector", "classifier"))
    store.register(u.device())
    models = {
        "detector": entry("2.0.0", refused={"3.0.0": "health check failed: too slow"}),
        "classifier": entry("0.3.0", pending="0.4.0", last_action="download"),
    }
    raw = u.send(store, 7, models, at=1234.5)
    assert store.last_report(u.device_id) == json.loads(raw)
    assert counters(store_url, u.device_id) == [7]
    device = store.device(u.device_id)
    assert device is not None and (device.last_counter, device.last_seen) == (7, 1234.5)
    states = {s.model: s for s in store.states()}
    assert states["detector"].refused == {"3.0.0": "health check failed: too slow"}
    assert states["detector"].version == "2.0.0" and states["detector"].reported_at == 1234.5
    assert states["classifier"].pending == "0.4.0" and not states["classifier"].stale
    assert [s.model for s in store.states(model="classifier", channel="stable")] == ["classifier"]
    assert store.states(channel="beta") == []

    # The next report replaces the states: a model no longer reported is gone.
    u.send(store, 8, {"detector": entry("2.0.0", stale=True)}, at=2000.0)
    (state,) = store.states()
    assert (state.model, state.stale, state.refused, state.reported_at) == (
        "detector",
        True,
        {},
        2000.0,
    )


@pytest.mark.parametrize("counter", [3, 2], ids=["equal", "lower"])
def test_a_replayed_counter_is_refused_409_and_not_stored(
    store: SQLStore, store_url: str, unit: Unit, counter: int
) -> None:
    first = unit.send(store, 3, {"detector": entry("1.0.0")})
    with pytest.raises(RefusedError) as refused:
        unit.send(store, counter, {"detector": entry("6.6.6")})
    assert (refused.value.code, refused.value.reason) == (409, "replayed")
    assert counters(store_url, unit.device_id) == [3]
    assert store.last_report(unit.device_id) == json.loads(first)
    (state,) = store.states()
    assert state.version == "1.0.0"
    device = store.device(unit.device_id)
    assert device is not None and device.last_counter == 3


def test_an_unregistered_device_is_refused_403_and_not_stored(
    store: SQLStore, store_url: str
) -> None:
    stranger = Unit()
    with pytest.raises(RefusedError) as refused:
        stranger.send(store, 1)
    assert (refused.value.code, refused.value.reason) == (403, "unregistered")
    assert counters(store_url, stranger.device_id) == []
    assert store.states() == [] and store.devices() == []


def test_a_revoked_device_is_refused_403_and_not_stored(
    store: SQLStore, store_url: str, unit: Unit
) -> None:
    unit.send(store, 1)
    store.revoke(unit.device_id, "decommissioned", time.time())
    with pytest.raises(RefusedError) as refused:
        unit.send(store, 2, {"detector": entry("9.9.9")})
    assert (refused.value.code, refused.value.reason) == (403, "revoked")
    assert counters(store_url, unit.device_id) == [1]
    assert [s.version for s in store.states()] == ["1.0.0"]


def test_two_ingests_of_one_counter_at_once_one_wins(
    store: SQLStore, store_url: str, unit: Unit
) -> None:
    bodies = {c: unit.body(c) for c in range(1, 11)}
    for counter, raw in bodies.items():
        doc = json.loads(raw)
        results = in_threads(
            2,
            functools.partial(
                lambda _i, c, r, d: store.ingest(unit.device_id, c, 1.0, d, r),
                c=counter,
                r=raw,
                d=doc,
            ),
        )
        accepted = [r for r in results if r is None]
        refused = [r for r in results if isinstance(r, RefusedError) and r.code == 409]
        assert (len(accepted), len(refused)) == (1, 1), results
    assert counters(store_url, unit.device_id) == list(range(1, 11))


def test_many_threads_on_one_store_lose_nothing(store: SQLStore, store_url: str) -> None:
    units = [Unit() for _ in range(6)]
    for u in units:
        store.register(u.device())

    def work(i: int) -> None:
        for counter in range(1, 16):
            units[i].send(store, counter)
            store.states()  # readers interleave with the writers

    assert in_threads(6, work) == [None] * 6
    for u in units:
        assert counters(store_url, u.device_id) == list(range(1, 16))


def test_two_stores_on_one_database_write_at_once_without_lock_errors(store_url: str) -> None:
    # Two services (or a service and `fleet register`) on one file: WAL, a busy timeout and
    # BEGIN IMMEDIATE make writers queue; on PostgreSQL, row locks.
    stores = [open_store(store_url) for _ in range(2)]
    units = [Unit() for _ in range(4)]
    try:
        for u in units:
            stores[0].register(u.device())

        def work(i: int) -> None:
            for counter in range(1, 21):
                units[i].send(stores[i % 2], counter)

        assert in_threads(4, work) == [None] * 4
    finally:
        for s in stores:
            s.close()
    for u in units:
        assert counters(store_url, u.device_id) == list(range(1, 21))
    if store_url.startswith("sqlite:"):
        assert query(store_url, "PRAGMA journal_mode") == [("wal",)]


def test_hostile_text_is_stored_not_a_database_error(store: SQLStore, unit: Unit) -> None:
    # NUL is refused by PostgreSQL's TEXT, a lone surrogate by both drivers' encoders.
    # A device's JSON may escape them (canonical() would not write the surrogate).
    bad = "boom\x00 SURROGATE end"
    raw = unit.body(1, {"detector": entry("1.0.0", last_error=bad, refused={"2\x00": bad})})
    raw = raw.replace(b"SURROGATE", b"\\ud800")
    doc = fleetreport.parse_report(raw)
    assert "\ud800" in doc["models"]["detector"]["last_error"]
    store.ingest(unit.device_id, 1, 1.0, doc, raw)
    (state,) = store.states()
    assert state.last_error is not None and state.last_error.startswith("boom")
    assert "\x00" not in state.last_error and "end" in state.last_error
    assert list(state.refused) == ["2\ufffd"]
    assert store.last_report(unit.device_id) is not None


def test_a_failure_mid_ingest_leaves_nothing_half_stored(
    store: SQLStore, store_url: str, unit: Unit
) -> None:
    unit.send(store, 1)
    raw = unit.body(2)
    doc = json.loads(raw)
    # A model state the database refuses (no name): the last statement of the transaction.
    doc["models"] = {"detector": entry("2.0.0"), None: entry("2.0.0")}
    with pytest.raises(StoreUnavailableError):
        store.ingest(unit.device_id, 2, 5.0, doc, raw)
    device = store.device(unit.device_id)
    assert device is not None and device.last_counter == 1
    assert counters(store_url, unit.device_id) == [1]
    assert [s.version for s in store.states()] == ["1.0.0"]
    unit.send(store, 2)  # and the store still works


# -- decisions ----------------------------------------------------------------------------


def decision(action: str = "halt", step: float = 10.0, at: float = 1.0) -> Decision:
    return Decision(
        model="detector",
        channel="stable",
        version="2.0.0",
        action=action,
        step=step,
        reason="3 of 5 failed (60% >= 5%)",
        decided_at=at,
        details={"failed": {"health check failed": 3}, "rate": 0.6},
    )


def test_claim_once_and_list_decisions(store: SQLStore) -> None:
    assert store.claim(decision())
    assert not store.claim(decision(at=2.0))
    assert store.claim(decision("widen", 25.0, at=3.0))
    assert store.claim(decision("widen", 50.0, at=0.5))
    got = store.decisions()
    assert [(d.action, d.step) for d in got] == [("widen", 50.0), ("halt", 10.0), ("widen", 25.0)]
    assert got[1] == decision()
    assert store.decisions("other") == []


def test_claim_from_two_stores_at_once_one_wins(store_url: str) -> None:
    stores = [open_store(store_url) for _ in range(2)]
    try:
        for step in (10.0, 25.0, 50.0):
            claim = functools.partial(lambda i, s: stores[i].claim(decision("widen", s)), s=step)
            results = in_threads(2, claim)
            assert sorted(results) == [False, True], results
        assert len(stores[0].decisions()) == 3
    finally:
        for s in stores:
            s.close()


# -- URLs and faults ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "",
        "mysql://db/fleet",
        "sqlite:/fleet.db",
        "sqlite://fleet.db",
        "sqlite:///",
        "sqlite:///:memory:",
        "sqlite:////no/such/folder/fleet.db",
        "postgresql://[::1",
        "postgresql://host/db?no_such_option=1",
        "postgresql://host:port/db",
    ],
)
def test_a_bad_url_is_one_clear_line(url: str) -> None:
    with pytest.raises(InvalidInputError) as error:
        open_store(url)
    line = error.value.diagnostics()
    assert "\n" not in line and ("sqlite:///" in line or "path" in line or "folder" in line)


def test_a_relative_sqlite_path_is_relative_to_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    open_store("sqlite:///fleet.db").close()
    assert (tmp_path / "fleet.db").is_file()


def test_a_file_that_is_not_a_database_is_unavailable_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    path.write_bytes(b"not a database at all, " * 100)
    with pytest.raises(StoreUnavailableError) as error:
        open_store(f"sqlite:///{path}")
    assert "\n" not in error.value.diagnostics()


def test_a_postgresql_server_that_is_not_there_is_unavailable() -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError) as error:
        open_store(f"postgresql://edgepack@127.0.0.1:{free_port()}/fleet")
    assert time.monotonic() - started < 10
    assert isinstance(error.value, EdgepackError)
    assert "127.0.0.1" in error.value.diagnostics() and "\n" not in error.value.diagnostics()


def test_a_closed_store_says_so(store: SQLStore) -> None:
    store.close()
    with pytest.raises(StoreUnavailableError, match="closed"):
        store.devices()


@pytest.fixture
def pg_store(pg_url: str) -> Iterator[tuple[str, SQLStore]]:
    url = pg.create_database(pg_url, f"restart_{free_port()}")
    store = open_store(url)
    try:
        yield url, store
    finally:
        store.close()


def test_postgresql_restarted_under_load_loses_no_acknowledged_report(
    pg_store: tuple[str, SQLStore],
) -> None:
    url, store = pg_store
    u = Unit()
    store.register(u.device())
    acknowledged: list[int] = []
    unavailable: list[int] = []
    replayed: list[int] = []  # a commit whose answer the crash swallowed: retried, then 409
    other: list[BaseException] = []
    done = threading.Event()

    def load() -> None:
        counter = 0
        while not done.is_set():
            counter += 1
            try:
                u.send(store, counter)
            except StoreUnavailableError:
                unavailable.append(counter)
                time.sleep(0.005)
            except RefusedError as exc:
                replayed.append(counter)
                other.extend([exc] if exc.code != 409 else [])
            except BaseException as exc:
                other.append(exc)
                return
            else:
                acknowledged.append(counter)

    thread = threading.Thread(target=load)
    thread.start()
    try:
        time.sleep(0.5)
        before = len(acknowledged)
        pg.stop(url)
        time.sleep(0.5)
        during = len(unavailable)
        pg.start(url)
        time.sleep(0.7)
    finally:
        done.set()
        thread.join(30)
    assert other == []
    assert before > 20 and during > 0
    assert acknowledged[-1] > unavailable[-1], "no report was acknowledged after the restart"
    kept = set(counters(url, u.device_id))
    assert set(acknowledged) <= kept
    device = store.device(u.device_id)
    assert device is not None and device.last_counter == max(kept)


def test_after_postgresql_restarts_the_next_call_reconnects(
    pg_store: tuple[str, SQLStore],
) -> None:
    url, store = pg_store
    u = Unit()
    store.register(u.device())
    u.send(store, 1)
    pg.stop(url)
    with pytest.raises(StoreUnavailableError, match="unavailable"):
        u.send(store, 2)
    pg.start(url)
    u.send(store, 2)  # a dead pooled connection is dropped, a fresh one opened
    pg.restart(url)
    assert [d.last_counter for d in store.devices()] == [2]
    assert counters(url, u.device_id) == [1, 2]
