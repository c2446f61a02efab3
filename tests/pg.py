"""A real PostgreSQL server for tests, from Debian's ``postgresql`` package.

:func:`postgres_server` makes a throw-away cluster (``initdb`` in a temporary
directory, trust authentication, no fsync), starts it with ``pg_ctl`` on a free
loopback port and a private socket folder, yields its URL and removes it all
afterwards. PostgreSQL refuses to run as root, so as root the cluster belongs to
the ``postgres`` user the package creates and its programs run through
``runuser``. :func:`restart` (and :func:`stop`, :func:`start`) act on a running
cluster by its URL, for the tests of a database restarted under load.

Debian keeps the server programs off PATH, in ``/usr/lib/postgresql/VERSION/bin``;
``tests/setup/install-services.sh`` installs the package.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.servers import free_port

USER = "edgepack"
MISSING = "PostgreSQL is not installed (run tests/setup/install-services.sh)"


def pg_bindir() -> Path | None:
    """The folder holding initdb and pg_ctl (newest installed version), or None."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parts[-3].split(".")],
    )
    return Path(candidates[-1]).parent if candidates else None


@dataclass
class Cluster:
    """One running test cluster: where it lives and how to run its programs."""

    bindir: Path
    root: Path
    port: int
    as_postgres: bool

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def sockets(self) -> Path:
        return self.root / "sockets"

    @property
    def url(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/postgres"

    def run(self, program: str, *args: str, timeout: float = 60) -> None:
        """Run one of the server's programs (as ``postgres`` when we are root)."""
        argv = [str(self.bindir / program), *args]
        if self.as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
        if out.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{program} failed ({out.returncode}): {out.stderr}{tail}")

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=200"
        )
        self.run(
            "pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data),
            "-l", str(self.root / "server.log"), "-o", options,
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self.run("pg_ctl", "stop", "-w", "-t", "60", "-m", mode, "-D", str(self.data))


_RUNNING: dict[str, Cluster] = {}


def _cluster_of(url: str) -> Cluster:
    for prefix, cluster in _RUNNING.items():
        if url.startswith(prefix):
            return cluster
    raise KeyError(f"no test cluster serves {url}")


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Run a fresh PostgreSQL cluster on a free loopback port; yield its URL
    (``postgresql://edgepack@127.0.0.1:PORT/postgres``, trust authentication)."""
    bindir = pg_bindir()
    if bindir is None:
        pytest.skip(MISSING)
    as_postgres = os.geteuid() == 0
    root = Path(tempfile.mkdtemp(prefix="edgepack-pg-"))
    try:
        (root / "sockets").mkdir()
        if as_postgres:
            owner = pwd.getpwnam("postgres")
            for path in (root, root / "sockets"):
                os.chown(path, owner.pw_uid, owner.pw_gid)
            root.chmod(0o700)
        cluster = Cluster(bindir, root, free_port(), as_postgres)
        cluster.run(
            "initdb", "-A", "trust", "-U", USER, "--no-sync", "-E", "UTF8", "--locale=C.UTF-8",
            "-D", str(cluster.data),
        )  # fmt: skip
        cluster.start()
        prefix = f"postgresql://{USER}@127.0.0.1:{cluster.port}/"
        _RUNNING[prefix] = cluster
        try:
            yield cluster.url
        finally:
            del _RUNNING[prefix]
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                cluster.stop("fast")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def stop(url: str) -> None:
    """Stop the test cluster serving ``url`` as a crash would (``-m immediate``)."""
    _cluster_of(url).stop("immediate")


def start(url: str) -> None:
    """Start the stopped test cluster serving ``url`` again (same data, same port)."""
    _cluster_of(url).start()


def restart(url: str) -> None:
    """Crash-stop and start again the test cluster serving ``url``."""
    stop(url)
    start(url)


def create_database(url: str, name: str) -> str:
    """Create the empty database ``name`` on the server of ``url``; return its URL."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return url.rsplit("/", 1)[0] + "/" + name
