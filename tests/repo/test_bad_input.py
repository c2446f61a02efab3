"""Bad input gets one clear error and leaves the repository byte-for-byte unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgepack import repo
from edgepack.errors import (
    BundleFormatError,
    InvalidInputError,
    KeyFileError,
    VerificationError,
)
from tests.repo.conftest import NOW, Producer, Repo, make_bundle, team_key, tree_hash


@pytest.fixture
def one_release(digits_repo: Repo, producer: Producer) -> Path:
    bundle = make_bundle(digits_repo.bundles, producer, "digits", "1.0.0")
    digits_repo.publish(bundle, channel="stable")
    return bundle


def test_bundle_failing_verification(
    digits_repo: Repo, producer: Producer, one_release: Path
) -> None:
    good = make_bundle(digits_repo.bundles, producer, "digits", "2.0.0")
    bad = digits_repo.bundles / "digits-2.0.0-any-bad.epk"
    bad.write_bytes(good.read_bytes()[:-700])  # truncated
    before = tree_hash(digits_repo.workdir)
    with pytest.raises(BundleFormatError):
        digits_repo.publish(bad)
    not_a_bundle = digits_repo.bundles / "notes.epk"
    not_a_bundle.write_bytes(b"hello")
    with pytest.raises(BundleFormatError):
        digits_repo.publish(not_a_bundle)
    assert tree_hash(digits_repo.workdir) == before


def test_bundle_from_an_untrusted_producer(
    digits_repo: Repo, producer: Producer, one_release: Path
) -> None:
    from edgepack.keys import generate_signing_key
    from edgepack.signing import TrustPolicy

    bundle = make_bundle(digits_repo.bundles, producer, "digits", "2.0.0")
    stranger = TrustPolicy.from_keys([generate_signing_key().public_key()])
    before = tree_hash(digits_repo.workdir)
    with pytest.raises(VerificationError):
        digits_repo.publish(bundle, policy=stranger)
    assert tree_hash(digits_repo.workdir) == before
    trusted = TrustPolicy.from_keys([producer.signing.public_key()])
    assert digits_repo.publish(bundle, policy=trusted).summary["targets"]


def test_duplicate_version(digits_repo: Repo, producer: Producer, one_release: Path) -> None:
    again = make_bundle(digits_repo.bundles / "again", producer, "digits", "1.0.0", payload=b"x")
    before = tree_hash(digits_repo.workdir)
    with pytest.raises(InvalidInputError, match=r"digits 1\.0\.0 \(any\) is already published"):
        digits_repo.publish(again)
    # the same bundle twice in one call is refused too
    new = make_bundle(digits_repo.bundles, producer, "digits", "3.0.0")
    with pytest.raises(InvalidInputError, match="given twice"):
        digits_repo.publish(new, new)
    assert tree_hash(digits_repo.workdir) == before


def test_unknown_model(digits_repo: Repo, producer: Producer, one_release: Path) -> None:
    stranger = make_bundle(digits_repo.bundles, producer, "faces", "1.0.0")
    before = tree_hash(digits_repo.workdir)
    with pytest.raises(InvalidInputError, match="unknown model 'faces'") as caught:
        digits_repo.publish(stranger)
    assert "edgepack repo add-model" in caught.value.diagnostics()
    with pytest.raises(InvalidInputError, match="unknown model 'faces'"):
        repo.promote(
            digits_repo.workdir,
            "faces",
            "1.0.0",
            channel="stable",
            passphrase=repo.no_passphrase,
            now=NOW,
        )
    with pytest.raises(InvalidInputError, match="not published"):
        repo.promote(
            digits_repo.workdir,
            "digits",
            "9.0.0",
            channel="stable",
            passphrase=repo.no_passphrase,
            now=NOW,
        )
    assert tree_hash(digits_repo.workdir) == before


def test_channel_outside_the_allowed_set(
    digits_repo: Repo, producer: Producer, one_release: Path
) -> None:
    before = tree_hash(digits_repo.workdir)
    with pytest.raises(InvalidInputError, match="unknown channel 'nightly'"):
        repo.promote(
            digits_repo.workdir,
            "digits",
            "1.0.0",
            channel="nightly",
            passphrase=repo.no_passphrase,
            now=NOW,
        )
    with pytest.raises(InvalidInputError, match="unknown channel"):
        digits_repo.publish(
            make_bundle(digits_repo.bundles, producer, "digits", "2.0.0"), channel="latest"
        )
    assert tree_hash(digits_repo.workdir) == before


def test_wrong_passphrase(tmp_path: Path, producer: Producer) -> None:
    workdir = tmp_path / "repo"
    repo.init(workdir, passphrase=b"correct horse", now=NOW)
    key = (workdir / "keys/targets.key").read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in key
    assert oct((workdir / "keys/targets.key").stat().st_mode & 0o777) == "0o600"
    assert not list((workdir / "public").rglob("*.key"))
    _private, public = team_key(tmp_path, "digits")
    before = tree_hash(workdir)
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        repo.add_model(workdir, "digits", public, passphrase=lambda _p: b"wrong", now=NOW)
    assert tree_hash(workdir) == before
    repo.add_model(workdir, "digits", public, passphrase=lambda _p: b"correct horse", now=NOW)


def test_corrupted_metadata_in_the_working_tree(
    digits_repo: Repo, producer: Producer, one_release: Path
) -> None:
    role = digits_repo.workdir / "public/metadata/1.model-digits.json"
    role.write_bytes(role.read_bytes()[:-20])  # not JSON any more
    before = tree_hash(digits_repo.workdir)
    with pytest.raises(InvalidInputError, match=r"1\.model-digits\.json is corrupted"):
        digits_repo.publish(make_bundle(digits_repo.bundles, producer, "digits", "2.0.0"))
    assert tree_hash(digits_repo.workdir) == before
    # parseable but altered: the signature check catches it
    targets = digits_repo.workdir / "public/metadata/2.targets.json"
    targets.write_bytes(targets.read_bytes().replace(b"models/digits/*", b"models/*/*"))
    before = tree_hash(digits_repo.workdir)
    with pytest.raises(InvalidInputError, match="fails its signature check"):
        repo.promote(
            digits_repo.workdir,
            "digits",
            "1.0.0",
            channel="beta",
            passphrase=repo.no_passphrase,
            now=NOW,
        )
    assert tree_hash(digits_repo.workdir) == before


def test_wrong_key_for_the_role(
    digits_repo: Repo, producer: Producer, one_release: Path, tmp_path: Path
) -> None:
    other_private, _ = team_key(tmp_path, "other")
    before = tree_hash(digits_repo.workdir)
    with pytest.raises(KeyFileError, match="cannot publish model 'digits'"):
        digits_repo.publish(
            make_bundle(digits_repo.bundles, producer, "digits", "2.0.0"), key=str(other_private)
        )
    with pytest.raises(KeyFileError, match="not a key of role 'operators'"):
        repo.promote(
            digits_repo.workdir,
            "digits",
            "1.0.0",
            channel="beta",
            key=str(other_private),
            passphrase=repo.no_passphrase,
            now=NOW,
        )
    assert tree_hash(digits_repo.workdir) == before


def test_signer_uri_is_accepted_wherever_a_key_is(digits_repo: Repo, producer: Producer) -> None:
    bundle = make_bundle(digits_repo.bundles, producer, "digits", "1.0.0")
    digits_repo.publish(bundle, key=f"file2:{digits_repo.team_private}")
    ops = digits_repo.workdir / "keys/operators.key"
    result = repo.promote(
        digits_repo.workdir,
        "digits",
        "1.0.0",
        channel="candidate",
        key=f"file2:{ops}",
        passphrase=repo.no_passphrase,
        now=NOW,
    )
    assert "operators" in result.versions
    with pytest.raises(KeyFileError, match="does not hold a key of role 'operators'"):
        repo.promote(
            digits_repo.workdir,
            "digits",
            "1.0.0",
            channel="beta",
            key=f"file2:{digits_repo.team_private}",
            passphrase=repo.no_passphrase,
            now=NOW,
        )
