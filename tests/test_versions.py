"""One version rule (PEP 440) for min_agent_version: ordering, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgepack import bundle, keys, versions
from edgepack.errors import InvalidInputError
from edgepack.signing import ProducerKeySigner


@pytest.mark.parametrize(
    ("have", "needed", "ok"),
    [
        ("0.1.0", "0.1.0rc9", True),  # a pre-release of this version: older
        ("0.1.0", "0.1.0-rc9", True),
        ("0.1.0", "0.1.0.0", True),  # the same version
        ("0.1.0", "0.2-rc1", False),  # 0.2rc1, not 0.21
        ("0.21.0", "0.2-rc1", True),
        ("0.10.0", "0.9.0", True),  # numeric, not text, order
        ("0.1.0", "99.0.0", False),
    ],
)
def test_order(have: str, needed: str, ok: bool) -> None:
    assert versions.at_least(have, needed) is ok


@pytest.mark.parametrize("bad", ["9" * 5000, "not a version", "", "1.0\n"])
def test_bad_versions_are_clear_errors(bad: str) -> None:
    with pytest.raises(InvalidInputError, match="PEP 440"):
        versions.at_least("0.1.0", bad)


def test_pack_refuses_a_min_agent_version_no_agent_can_compare(tmp_path: Path) -> None:
    from tests.agent._support import make_model_dir

    health = make_model_dir(tmp_path / "m", 2.0)
    with pytest.raises(InvalidInputError, match="min_agent_version"):
        bundle.pack(
            tmp_path / "m",
            tmp_path / "out",
            name="digits",
            version="1.0.0",
            recipients=[keys.generate_recipient_key().public_key()],
            signer=ProducerKeySigner(keys.generate_signing_key()),
            health=health,
            min_agent_version="soon",
        )
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("field", ["name", "version", "profile"])
def test_pack_refuses_a_trailing_newline_in_a_name(tmp_path: Path, field: str) -> None:
    """``re.match`` with ``$`` accepts ``"digits\\n"``; every name rule is a full match."""
    from tests.agent._support import make_model_dir

    health = make_model_dir(tmp_path / "m", 2.0)
    names = {"name": "digits", "version": "1.0.0", "profile": "generic-x86_64"}
    names[field] += "\n"
    with pytest.raises(InvalidInputError):
        bundle.pack(
            tmp_path / "m",
            tmp_path / "out",
            recipients=[keys.generate_recipient_key().public_key()],
            signer=ProducerKeySigner(keys.generate_signing_key()),
            health=health,
            name=names["name"],
            version=names["version"],
            profile=names["profile"],
        )
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
