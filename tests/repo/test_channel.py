"""Channel documents: parsing, canonical bytes, rollout buckets, selection, transitions."""

from __future__ import annotations

import json

import pytest

from edgepack import channel as ch
from edgepack.errors import InvalidInputError

EXAMPLE = {
    "format": "edgepack-channel",
    "format_version": 1,
    "model": "digits",
    "channel": "stable",
    "sequence": 4,
    "current": {
        "version": "3.0.0",
        "rollout": 50,
        "cohorts": [],
        "variants": {
            "intel-nuc": {
                "target": "models/digits/digits-3.0.0-intel-nuc.epk",
                "architecture": "x86_64",
            },
            "raspberry-pi-4": {
                "target": "models/digits/digits-3.0.0-raspberry-pi-4.epk",
                "architecture": "aarch64",
            },
        },
    },
    "previous": [
        {
            "version": "1.0.0",
            "rollout": 100,
            "cohorts": [],
            "variants": {
                "any": {"target": "models/digits/digits-1.0.0-any.epk", "architecture": "any"}
            },
        }
    ],
    "revoked": ["2.0.0"],
}


def _bytes(doc: dict[str, object]) -> bytes:
    return json.dumps(doc).encode()


def _in_and_out(version: str, percent: float) -> tuple[str, str]:
    """Two device ids: one inside, one outside a rollout of ``percent``."""
    inside = outside = None
    for i in range(1000):
        dev = f"dev-{i}"
        if ch.rollout_bucket("digits", version, dev) < percent:
            inside = inside or dev
        else:
            outside = outside or dev
        if inside and outside:
            return inside, outside
    raise AssertionError("no split found")


def test_example_round_trips_canonically() -> None:
    doc = ch.parse_channel(_bytes(EXAMPLE))
    assert doc.model == "digits" and doc.channel == "stable" and doc.sequence == 4
    assert doc.current is not None and doc.current.rollout == 50
    data = doc.to_bytes()
    assert json.loads(data) == EXAMPLE
    assert ch.parse_channel(data) == doc
    assert data == ch.parse_channel(data).to_bytes()
    assert b" " not in data.strip()  # compact, sorted: the canonical form


def test_rollout_bucket_matches_the_contract_and_is_sticky() -> None:
    import hashlib

    digest = hashlib.sha256(b"digits/3.0.0/dev-1").digest()
    assert ch.rollout_bucket("digits", "3.0.0", "dev-1") == (
        int.from_bytes(digest[:8], "big") % 10000 / 100
    )
    devices = [f"dev-{i}" for i in range(500)]
    admitted_by = {
        pct: {d for d in devices if ch.rollout_bucket("digits", "3.0.0", d) < pct}
        for pct in (5, 25, 50, 100)
    }
    assert admitted_by[5] <= admitted_by[25] <= admitted_by[50] <= admitted_by[100]
    assert admitted_by[100] == set(devices)
    assert 150 < len(admitted_by[50]) < 350


def test_select_current_in_rollout_else_previous() -> None:
    doc = ch.parse_channel(_bytes(EXAMPLE))
    inside, outside = _in_and_out("3.0.0", 50)
    sel = ch.select_release(
        doc, device_id=inside, profile="raspberry-pi-4", architecture="aarch64", cohort=None
    )
    assert sel.ok and sel.version == "3.0.0" and sel.variant_key == "raspberry-pi-4"
    assert sel.variant is not None and sel.variant.target.endswith("raspberry-pi-4.epk")
    sel = ch.select_release(
        doc, device_id=outside, profile="raspberry-pi-4", architecture="aarch64", cohort=None
    )
    assert sel.ok and sel.version == "1.0.0" and sel.variant_key == "any"


def test_select_no_variant_is_reported() -> None:
    doc = ch.parse_channel(_bytes(EXAMPLE))
    inside, _ = _in_and_out("3.0.0", 50)
    sel = ch.select_release(
        doc, device_id=inside, profile="jetson-orin-nano", architecture="aarch64", cohort=None
    )
    assert not sel.ok and sel.version == "3.0.0" and sel.reason == "no-variant"
    # a profile variant for another architecture does not fit
    sel = ch.select_release(
        doc, device_id=inside, profile="intel-nuc", architecture="aarch64", cohort=None
    )
    assert not sel.ok and sel.reason == "no-variant"


def test_select_never_picks_a_revoked_version() -> None:
    doc = ch.parse_channel(_bytes(EXAMPLE))
    inside, _ = _in_and_out("3.0.0", 50)
    doc = ch.revoke(doc, "3.0.0")
    assert doc.sequence == 5 and "3.0.0" in doc.revoked
    sel = ch.select_release(
        doc, device_id=inside, profile="raspberry-pi-4", architecture="aarch64", cohort=None
    )
    assert sel.version == "1.0.0"
    doc = ch.revoke(doc, "1.0.0")
    sel = ch.select_release(
        doc, device_id=inside, profile="raspberry-pi-4", architecture="aarch64", cohort=None
    )
    assert sel.release is None and sel.reason == "no-eligible-release"


def test_cohorts_restrict_a_release() -> None:
    doc = ch.promote(
        ch.new_document("digits", "beta"),
        ch.Release("1.0.0", 100, (), {"any": ch.Variant("models/digits/d-1-any.epk", "any")}),
    )
    doc = ch.promote(
        doc,
        ch.Release("2.0.0", 100, ("lab",), {"any": ch.Variant("models/digits/d-2-any.epk", "any")}),
    )
    kw = {"device_id": "d", "profile": None, "architecture": "x86_64"}
    assert ch.select_release(doc, cohort="lab", **kw).version == "2.0.0"  # type: ignore[arg-type]
    assert ch.select_release(doc, cohort=None, **kw).version == "1.0.0"  # type: ignore[arg-type]
    assert ch.select_release(doc, cohort="field", **kw).version == "1.0.0"  # type: ignore[arg-type]


def test_promote_rollback_revoke_transitions() -> None:
    def rel(v: str, rollout: float = 100) -> ch.Release:
        return ch.Release(v, rollout, (), {"any": ch.Variant(f"models/m/m-{v}-any.epk", "any")})

    doc = ch.new_document("m", "stable")
    doc = ch.promote(doc, rel("1"))
    doc = ch.promote(doc, rel("2", 10))
    doc = ch.promote(doc, rel("2", 60))  # growing rollout: previous unchanged
    assert doc.sequence == 3 and doc.current == rel("2", 60)
    assert [r.version for r in doc.previous] == ["1"]
    doc = ch.promote(doc, rel("3"))
    back = ch.rollback(doc)
    assert back.sequence == doc.sequence + 1
    assert back.current is not None and back.current.version == "2"
    assert back.current.rollout == 100
    assert [r.version for r in back.previous] == ["3", "1"]
    to_one = ch.rollback(doc, "1")
    assert to_one.current is not None and to_one.current.version == "1"
    assert [r.version for r in to_one.previous] == ["3", "2"]
    with pytest.raises(InvalidInputError, match="never on this channel"):
        ch.rollback(doc, "9")
    with pytest.raises(InvalidInputError, match="revoked"):
        ch.rollback(ch.revoke(doc, "2"), "2")
    with pytest.raises(InvalidInputError, match="revoked"):
        ch.promote(ch.revoke(doc, "4"), rel("4"))
    assert ch.revoke(ch.revoke(doc, "1"), "1").sequence == doc.sequence + 1
    with pytest.raises(InvalidInputError, match="no release"):
        ch.rollback(ch.new_document("m", "edge"))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(channel="nightly"), "unknown channel"),
        (lambda d: d.update(format="other"), "not a channel document"),
        (lambda d: d.update(format_version=2), "format_version"),
        (lambda d: d.update(sequence=0), "sequence"),
        (lambda d: d.update(sequence=True), "sequence"),
        (lambda d: d.update(model="../x"), "invalid model name"),
        (lambda d: d.update(extra=1), "unknown field"),
        (lambda d: d.pop("current"), "lacks current"),
        (lambda d: d["current"].update(rollout=101), "rollout"),
        (lambda d: d["current"].update(rollout="50"), "rollout"),
        (lambda d: d["current"].update(cohorts=["a", "a"]), "twice"),
        (
            lambda d: d["current"]["variants"]["intel-nuc"].update(target="models/other/x.epk"),
            "not a bundle under",
        ),
        (
            lambda d: d["current"]["variants"]["intel-nuc"].update(
                target="models/digits/../other/x.epk"
            ),
            "not a bundle under",
        ),
        (
            lambda d: d["current"]["variants"]["intel-nuc"].update(architecture="mips"),
            "architecture",
        ),
        (lambda d: d["previous"].append(dict(d["current"])), "same version twice"),
        (lambda d: d.update(revoked="2.0.0"), "list of strings"),
    ],
)
def test_parse_rejects_bad_documents(mutate: object, message: str) -> None:
    doc = json.loads(json.dumps(EXAMPLE))
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(InvalidInputError, match=message):
        ch.parse_channel(_bytes(doc))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b'{"a": 1, "a": 2}', "duplicate key"),
        (b'{"a": NaN}', "not allowed"),
        (b"[]", "must be a JSON object"),
        (b" " * (ch.MAX_DOCUMENT_BYTES + 1), "limit"),
    ],
)
def test_parse_rejects_bad_bytes(data: bytes, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        ch.parse_channel(data)


def test_channel_names() -> None:
    assert ch.CHANNELS == ("stable", "candidate", "beta", "edge")
    assert ch.channel_target_path("digits", "edge") == "channels/digits/edge.json"
    with pytest.raises(InvalidInputError, match="unknown channel"):
        ch.channel_target_path("digits", "latest")
