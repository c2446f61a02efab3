"""Separation of duties, enforced by TUF itself: proven with ngclient, not our CLI.

Each test plays an insider who holds one key and gets metadata signed with it
into the served tree (through honest snapshot/timestamp roles, bypassing our
own checks); the device must still refuse what that key may not decide.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from tuf.api.exceptions import RepositoryError

from edgepack import channel as ch
from edgepack import repo
from edgepack.errors import InvalidInputError, KeyFileError
from edgepack.repo._tuf import Metadata, TargetFile, Targets
from tests.repo.conftest import (
    NOW,
    Producer,
    Repo,
    Server,
    forge,
    make_bundle,
    new_client,
    signer_from_pem,
    team_key,
)

EVIL = b"evil bundle bytes"


def _add(path: str) -> Callable[[Metadata[Targets]], None]:
    def mutate(md: Metadata[Targets]) -> None:
        md.signed.targets[path] = TargetFile.from_data(path, EVIL)

    return mutate


@pytest.fixture
def two_models(digits_repo: Repo, producer: Producer, tmp_path: Path) -> tuple[Path, str]:
    """A second model ("faces") with its own team key and a published, promoted release."""
    private, public = team_key(tmp_path / "teams", "faces")
    repo.add_model(digits_repo.workdir, "faces", public, passphrase=repo.no_passphrase, now=NOW)
    bundle = make_bundle(digits_repo.bundles, producer, "faces", "1.0.0")
    digits_repo.publish(bundle, key=str(private), channel="stable")
    digits_repo.publish(make_bundle(digits_repo.bundles, producer, "digits", "1.0.0"))
    return private, "models/faces/faces-1.0.0-any.epk"


def test_team_key_cannot_sign_another_models_bundle(
    digits_repo: Repo,
    server: Server,
    producer: Producer,
    two_models: tuple[Path, str],
    tmp_path: Path,
) -> None:
    _faces_key, genuine = two_models
    claimed = "models/faces/faces-9.9.9-any.epk"
    digits_signer = signer_from_pem(digits_repo.team_private)
    # our CLI refuses ...
    with pytest.raises(KeyFileError, match="cannot publish model 'faces'"):
        digits_repo.publish(make_bundle(digits_repo.bundles, producer, "faces", "2.0.0"))
    # ... and so does TUF when the digits team signs paths of faces anyway
    forge(
        digits_repo.workdir,
        "model-digits",
        _add(claimed),
        [digits_signer],
        files={claimed: EVIL},
    )
    forge(
        digits_repo.workdir,
        "model-digits",
        _add(genuine),
        [digits_signer],
    )
    device = new_client(server, tmp_path / "dev")
    assert device.get_targetinfo(claimed) is None
    info = device.get_targetinfo(genuine)
    assert info is not None and info.length != len(EVIL)  # the faces team's own target


def test_operator_key_cannot_publish_model_bytes(
    digits_repo: Repo, server: Server, producer: Producer, tmp_path: Path
) -> None:
    digits_repo.publish(make_bundle(digits_repo.bundles, producer, "digits", "1.0.0"))
    claimed = "models/digits/digits-6.6.6-any.epk"
    operator = signer_from_pem(digits_repo.workdir / "keys/operators.key")
    with pytest.raises(KeyFileError, match="cannot publish model 'digits'"):
        digits_repo.publish(
            make_bundle(digits_repo.bundles, producer, "digits", "6.6.6"),
            key=str(digits_repo.workdir / "keys/operators.key"),
        )
    forge(
        digits_repo.workdir,
        "operators",
        _add(claimed),
        [operator],
        files={claimed: EVIL},
    )
    device = new_client(server, tmp_path / "dev")
    assert device.get_targetinfo(claimed) is None


def test_team_key_cannot_move_a_channel(
    digits_repo: Repo, server: Server, producer: Producer, tmp_path: Path
) -> None:
    digits_repo.publish(
        make_bundle(digits_repo.bundles, producer, "digits", "1.0.0"), channel="stable"
    )
    path = ch.channel_target_path("digits", "stable")
    team = signer_from_pem(digits_repo.team_private)
    forge(
        digits_repo.workdir,
        "model-digits",
        _add(path),
        [team],
        files={path: EVIL},
    )
    device = new_client(server, tmp_path / "dev")
    info = device.get_targetinfo(path)
    assert info is not None
    doc = ch.parse_channel(Path(device.download_target(info)).read_bytes())
    assert doc.current is not None and doc.current.version == "1.0.0"  # the operators' document

    # signing the operators' role itself with the team key is refused outright
    forge(digits_repo.workdir, "operators", _add(path), [team], files={path: EVIL})
    device = new_client(server, tmp_path / "dev2")
    with pytest.raises(RepositoryError):
        device.get_targetinfo(path)
    # and our own tools refuse to edit a tree whose operators' role fails its check
    with pytest.raises(InvalidInputError, match="fails its signature check"):
        repo.promote(
            digits_repo.workdir,
            "digits",
            "1.0.0",
            channel="beta",
            passphrase=repo.no_passphrase,
            now=NOW,
        )


def test_delegation_path_escape_through_a_sub_delegation(
    digits_repo: Repo, server: Server, two_models: tuple[Path, str], tmp_path: Path
) -> None:
    """The digits team delegates faces' paths to a role of its own: TUF never walks there."""
    from edgepack.repo._tuf import DelegatedRole, Delegations

    _faces_key, genuine = two_models
    team = signer_from_pem(digits_repo.team_private)
    escape = "models/faces/faces-7.0.0-any.epk"

    def delegate(md: Metadata[Targets]) -> None:
        key = team.public_key
        md.signed.delegations = Delegations(
            keys={key.keyid: key},
            roles={"escape": DelegatedRole("escape", [key.keyid], 1, True, ["models/faces/*"])},
        )

    forge(digits_repo.workdir, "model-digits", delegate, [team])
    forge(
        digits_repo.workdir,
        "escape",
        _add(escape),
        [team],
        parent="model-digits",
        files={escape: EVIL},
    )
    device = new_client(server, tmp_path / "dev")
    assert device.get_targetinfo(escape) is None
    assert device.get_targetinfo(genuine) is not None
