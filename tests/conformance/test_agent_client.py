"""The conformance CLI (``agent_client.py``) as the tuf-conformance suite drives it.

Each test runs the CLI as a subprocess against a real TUF repository
(``tests/agent/_tufrepo.py``, Ed25519-signed, consistent snapshots) served by
Python's HTTP server on loopback, and checks exit codes, the trusted metadata
the CLI leaves in ``--metadata-dir`` and the bytes it puts in ``--target-dir``.
The suite itself is not vendored; ``make conformance`` runs it against a
local checkout (see docs/threat-model.md, "TUF conformance").
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote

import pytest
from tuf.api.metadata import Metadata, TargetFile  # type: ignore[attr-defined]

from tests.agent._tufrepo import TEAM, TufRepo
from tests.servers import python_server

CLI = Path(__file__).with_name("agent_client.py")
MODEL = "digits"


@dataclass
class Setup:
    """A served repository and the suite-style directories of one client."""

    repo: TufRepo
    url: str
    root_file: Path
    metadata_dir: Path
    target_dir: Path

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(CLI), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def run_init(self) -> subprocess.CompletedProcess[str]:
        return self.cli("--metadata-dir", str(self.metadata_dir), "init", str(self.root_file))

    def refresh(self) -> subprocess.CompletedProcess[str]:
        return self.cli(
            "--metadata-url",
            f"{self.url}/metadata/",
            "--metadata-dir",
            str(self.metadata_dir),
            "refresh",
        )

    def download(self, target: str) -> subprocess.CompletedProcess[str]:
        return self.cli(
            "--metadata-url",
            f"{self.url}/metadata/",
            "--metadata-dir",
            str(self.metadata_dir),
            "--target-name",
            target,
            "--target-base-url",
            f"{self.url}/targets/",
            "--target-dir",
            str(self.target_dir),
            "download",
        )

    def trusted_version(self, role: str) -> int:
        md = Metadata.from_file(str(self.metadata_dir / f"{role}.json"))
        return md.signed.version

    def downloaded(self) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in self.target_dir.iterdir() if p.is_file()}

    def served(self, target: str) -> Path:
        """The hash-prefixed file the repository serves for ``target``."""
        info = self.repo.delegated[TEAM].signed.targets[target]
        digest = next(iter(info.hashes.values()))
        path = Path(target)
        return self.repo.targets_dir / path.parent / f"{digest}.{path.name}"


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    public = tmp_path / "public"
    repo = TufRepo(public, MODEL)
    root_file = tmp_path / "initial_root.json"
    root_file.write_bytes((repo.meta_dir / "1.root.json").read_bytes())
    metadata_dir = tmp_path / "client" / "metadata"
    target_dir = tmp_path / "client" / "targets"
    metadata_dir.mkdir(parents=True)
    target_dir.mkdir(parents=True)
    with python_server(public) as url:
        yield Setup(repo, url, root_file, metadata_dir, target_dir)


def target(name: str) -> str:
    return f"models/{MODEL}/{name}"


def test_init_refresh_stores_unversioned_trusted_metadata(setup: Setup) -> None:
    assert setup.run_init().returncode == 0
    assert (setup.metadata_dir / "root.json").read_bytes() == setup.root_file.read_bytes()
    result = setup.refresh()
    assert result.returncode == 0, result.stderr
    names = {p.name for p in setup.metadata_dir.iterdir() if p.suffix == ".json"}
    assert names == {"root.json", "timestamp.json", "snapshot.json", "targets.json"}
    assert setup.trusted_version("timestamp") == setup.repo.timestamp.signed.version
    # The trusted file holds the repository's bytes, not a re-serialisation.
    assert (setup.metadata_dir / "timestamp.json").read_bytes() == (
        setup.repo.meta_dir / "timestamp.json"
    ).read_bytes()


def test_init_refuses_a_file_that_is_not_root_metadata(setup: Setup) -> None:
    setup.root_file.write_text('{"signed": {"_type": "targets"}, "signatures": []}')
    assert setup.run_init().returncode == 1
    assert setup.refresh().returncode == 1


def test_download_verifies_caches_and_replaces_on_change(setup: Setup) -> None:
    setup.repo.add_target(TEAM, target("a.bin"), b"first bytes")
    setup.repo.commit({TEAM})
    assert setup.run_init().returncode == 0
    result = setup.download(target("a.bin"))
    assert result.returncode == 0, result.stderr
    name = quote(target("a.bin"), "")
    assert setup.downloaded() == {name: b"first bytes"}

    # A second download is served from the cache: the repository no longer has the file.
    setup.served(target("a.bin")).unlink()
    assert setup.download(target("a.bin")).returncode == 0
    assert setup.downloaded() == {name: b"first bytes"}

    # New content under the same target path replaces the file of the same name.
    setup.repo.add_target(TEAM, target("a.bin"), b"second bytes")
    setup.repo.commit({TEAM})
    assert setup.download(target("a.bin")).returncode == 0
    assert setup.downloaded() == {name: b"second bytes"}


def test_unknown_target_fails_after_refreshing(setup: Setup) -> None:
    assert setup.run_init().returncode == 0
    assert setup.download(target("missing.bin")).returncode == 1
    assert setup.trusted_version("targets") == 1  # metadata was refreshed all the same
    assert setup.downloaded() == {}


def test_tampered_target_is_refused_and_not_stored(setup: Setup) -> None:
    setup.repo.add_target(TEAM, target("a.bin"), b"good a")
    setup.repo.add_target(TEAM, target("b.bin"), b"good b")
    setup.repo.commit({TEAM})
    assert setup.run_init().returncode == 0
    assert setup.download(target("a.bin")).returncode == 0

    for name in ("a.bin", "b.bin"):
        setup.served(target(name)).write_bytes(b"evil bytes")
    result = setup.download(target("b.bin"))
    assert result.returncode == 1
    assert "LengthOrHashMismatch" in result.stderr or "DownloadLength" in result.stderr
    # a.bin stays as verified (cached, never re-fetched); b.bin was not stored.
    assert setup.download(target("a.bin")).returncode == 0
    assert setup.downloaded() == {quote(target("a.bin"), ""): b"good a"}


def test_expired_timestamp_is_refused(setup: Setup) -> None:
    assert setup.run_init().returncode == 0
    assert setup.refresh().returncode == 0
    trusted = setup.trusted_version("timestamp")

    setup.repo.refresh_timestamp(expires=datetime.now(timezone.utc) - timedelta(days=1))
    result = setup.refresh()
    assert result.returncode == 1
    assert "expired" in result.stderr.lower()
    assert setup.trusted_version("timestamp") == trusted


def test_timestamp_version_rollback_is_refused(setup: Setup) -> None:
    assert setup.run_init().returncode == 0
    old = (setup.repo.meta_dir / "timestamp.json").read_bytes()
    setup.repo.refresh_timestamp()
    assert setup.refresh().returncode == 0
    newer = setup.trusted_version("timestamp")

    (setup.repo.meta_dir / "timestamp.json").write_bytes(old)  # a validly signed older version
    assert setup.refresh().returncode == 1
    assert setup.trusted_version("timestamp") == newer


def test_target_without_sha256_is_refused_cleanly(setup: Setup) -> None:
    """The agent names bundles by sha256: a sha512-only target fails as bad data, not a crash."""
    path = target("c.bin")
    data = b"sha512 only"
    info = TargetFile.from_data(path, data, ["sha512"])
    served = setup.repo.targets_dir / "models" / MODEL / f"{info.hashes['sha512']}.c.bin"
    served.parent.mkdir(parents=True, exist_ok=True)
    served.write_bytes(data)
    setup.repo.delegated[TEAM].signed.targets[path] = info
    setup.repo.commit({TEAM})
    assert setup.run_init().returncode == 0
    result = setup.download(path)
    assert result.returncode == 1
    assert "RepositoryError" in result.stderr and "sha256" in result.stderr
    assert setup.downloaded() == {}
