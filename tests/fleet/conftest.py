"""Fleet-store fixtures for every test under tests/fleet.

``pg_url``: one real PostgreSQL server for the session (tests/pg.py).
``store_url``: a fresh, empty database per test, once on SQLite and once on
PostgreSQL (not yet migrated). ``store``: that database opened and migrated.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgepack.fleet.sql import SQLStore, open_store
from tests.pg import create_database, postgres_server

_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """The URL of the session's PostgreSQL server (its ``postgres`` database)."""
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a fresh empty database: a file under tmp_path, or ``t_N`` on the server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.db'}"
    server: str = request.getfixturevalue("pg_url")
    return create_database(server, f"t_{next(_numbers)}")


@pytest.fixture
def store(store_url: str) -> Iterator[SQLStore]:
    """The store of ``store_url``, migrated, closed after the test."""
    opened = open_store(store_url)
    try:
        yield opened
    finally:
        opened.close()
