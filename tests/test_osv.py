"""OSV advisory matching (edgepack.osv) and ``edgepack audit`` on real bundles.

The records in tests/data/osv are real advisories (transcribed, see its README);
the malformed, oversize and synthetic ones are written here into a temporary
copy of that directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from edgepack.bundle import pack
from edgepack.cli import main
from edgepack.keys import generate_recipient_key, generate_signing_key
from edgepack.osv import (
    MAX_FILE_BYTES,
    AdvisoryDatabase,
    cvss3_base_score,
    load_advisories,
    normalize_name,
)
from edgepack.signing import ProducerKeySigner
from tests.bundle.conftest import write_linear_model

DATA = Path(__file__).parent / "data" / "osv"


def ids(db: AdvisoryDatabase, package: str, version: str) -> list[str]:
    findings, skipped = db.match({package: version})
    assert skipped == []
    return [f.advisory_id for f in findings]


@pytest.fixture(scope="module")
def real() -> AdvisoryDatabase:
    db = load_advisories(DATA)
    assert db.skipped == []
    return db


@pytest.fixture
def mirror(tmp_path: Path) -> Path:
    """A writable copy of the real advisories, to add bad files next to them."""
    return Path(shutil.copytree(DATA, tmp_path / "osv"))


def write(directory: Path, name: str, record: Any) -> Path:
    path = directory / name
    path.write_text(json.dumps(record))
    return path


def record(
    advisory_id: str, package: str, events: list[dict[str, str]], **extra: Any
) -> dict[str, Any]:
    return {
        "id": advisory_id,
        "affected": [
            {
                "package": {"ecosystem": "PyPI", "name": package},
                "ranges": [{"type": "ECOSYSTEM", "events": events}],
                **extra,
            }
        ],
    }


def test_torch_below_at_and_above_the_fixed_version(real: AdvisoryDatabase) -> None:
    assert ids(real, "torch", "2.5.1") == ["GHSA-53q9-r3pm-6pq6"]
    assert ids(real, "torch", "1.0") == ["GHSA-53q9-r3pm-6pq6"]
    assert ids(real, "torch", "2.6.0") == []
    assert ids(real, "torch", "2.10.0") == []  # a string comparison would say "2.10.0" < "2.6.0"
    finding = real.match({"torch": "2.5.1"})[0][0]
    assert finding.aliases == ("CVE-2025-32434",)
    assert finding.severity == "critical"
    assert finding.fixed == ("2.6.0",)
    assert finding.package == "torch" and finding.version == "2.5.1"


def test_pre_release_of_the_fixed_version_is_affected(real: AdvisoryDatabase) -> None:
    assert ids(real, "torch", "2.6.0rc1") == ["GHSA-53q9-r3pm-6pq6"]
    assert ids(real, "torch", "2.6.0.post1") == []


def test_introduced_above_zero(real: AdvisoryDatabase) -> None:
    assert ids(real, "torchserve", "0.0.9") == []
    assert ids(real, "torchserve", "0.1.0") == ["GHSA-8fxr-qfr9-p34w"]
    assert ids(real, "torchserve", "0.8.1") == ["GHSA-8fxr-qfr9-p34w"]
    assert ids(real, "torchserve", "0.8.2") == []
    finding = real.match({"torchserve": "0.8.1"})[0][0]
    assert finding.aliases == ("CVE-2023-43654",) and finding.fixed == ("0.8.2",)


def test_names_are_normalised_per_pep_503(tmp_path: Path) -> None:
    write(tmp_path, "a.json", record("X-1", "Foo_Bar.baz", [{"introduced": "0"}, {"fixed": "2"}]))
    db = load_advisories(tmp_path)
    assert normalize_name("Foo_Bar.baz") == "foo-bar-baz"
    assert ids(db, "foo-bar--baz", "1.0") == ["X-1"]
    assert ids(db, "FOO.BAR_BAZ", "1.0") == ["X-1"]
    assert ids(db, "foobarbaz", "1.0") == []


def test_last_affected_unordered_events_and_version_lists(tmp_path: Path) -> None:
    write(
        tmp_path,
        "a.json",
        record("X-LA", "pkg", [{"last_affected": "1.4.2"}, {"introduced": "1.2"}]),
    )
    write(
        tmp_path,
        "b.json",
        record(
            "X-TWO",
            "pkg",
            [{"introduced": "0"}, {"fixed": "1.0"}, {"introduced": "3.0"}, {"fixed": "3.1"}],
            versions=["2.0"],
        ),
    )
    db = load_advisories(tmp_path)
    assert db.skipped == []
    assert ids(db, "pkg", "1.1") == []
    assert ids(db, "pkg", "1.2.0") == ["X-LA"]
    assert ids(db, "pkg", "1.4.2") == ["X-LA"]
    assert ids(db, "pkg", "1.4.3") == []
    assert ids(db, "pkg", "0.9") == ["X-TWO"]
    assert ids(db, "pkg", "2.0.0") == ["X-TWO"]  # the versions list, compared as versions
    assert ids(db, "pkg", "2.1") == []
    assert ids(db, "pkg", "3.0.5") == ["X-TWO"]
    assert db.match({"pkg": "0.9"})[0][0].fixed == ("1.0", "3.1")


def test_bad_files_are_skipped_with_a_reason_and_the_rest_still_match(mirror: Path) -> None:
    (mirror / "broken.json").write_text('{"id": "X", "affected": [')
    (mirror / "huge.json").write_bytes(b" " * (MAX_FILE_BYTES + 1))
    (mirror / "deep.json").write_text("[" * 100000 + "]" * 100000)
    write(mirror, "noid.json", {"affected": []})
    write(mirror, "noaffected.json", {"id": "X-NA"})
    eco = record("X-ECO", "torch", [{"introduced": "0"}])
    eco["affected"][0]["package"]["ecosystem"] = "NotAnEcosystem"
    write(mirror, "eco.json", eco)
    write(mirror, "pep440.json", record("X-VER", "torch", [{"introduced": "0"}, {"fixed": "2.x"}]))
    write(
        mirror,
        "list.json",
        [record("X-L1", "torch", [{"introduced": "0"}]), {"id": "X-L2"}],
    )
    (mirror / "notes.txt").write_text("not json, not read")
    db = load_advisories(mirror)
    reasons = {Path(s.source.split("[")[0]).name: s.reason for s in db.skipped}
    assert set(reasons) == {
        "broken.json", "huge.json", "deep.json", "noid.json", "noaffected.json",
        "eco.json", "pep440.json", "list.json",
    }  # fmt: skip
    assert reasons["broken.json"].startswith("not valid JSON")
    assert "larger than 4 MiB" in reasons["huge.json"]
    assert "no 'id'" in reasons["noid.json"]
    assert "no 'affected'" in reasons["noaffected.json"]
    assert "unknown ecosystem 'NotAnEcosystem'" in reasons["eco.json"]
    assert "'2.x' is not PEP 440" in reasons["pep440.json"]
    assert any(s.source.endswith("list.json[1]") for s in db.skipped)
    assert all("\n" not in s.reason for s in db.skipped)
    assert sorted(ids(db, "torch", "2.5.1")) == ["GHSA-53q9-r3pm-6pq6", "X-L1"]
    assert ids(db, "onnx", "1.20.1") == ["GHSA-p433-9wv8-28xj"]


def test_other_known_ecosystems_are_ignored(tmp_path: Path) -> None:
    npm = record("X-NPM", "torch", [{"introduced": "0"}])
    npm["affected"][0]["package"]["ecosystem"] = "npm"
    write(tmp_path, "npm.json", npm)
    db = load_advisories(tmp_path)
    assert db.skipped == []
    assert ids(db, "torch", "1.0") == []


def test_component_version_not_pep_440_is_skipped(real: AdvisoryDatabase) -> None:
    findings, skipped = real.match({"torch": "2.5.1", "onnx": "latest"})
    assert [f.advisory_id for f in findings] == ["GHSA-53q9-r3pm-6pq6"]
    assert [(s.source, s.reason) for s in skipped] == [("onnx latest", "version is not PEP 440")]


def test_severity_from_cvss_when_github_gives_none(tmp_path: Path) -> None:
    assert cvss3_base_score("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H") == 9.8
    assert cvss3_base_score("CVSS:3.1/AV:L/AC:L/PR:N/UI:R/S:U/C:H/I:N/A:N") == 5.5
    assert cvss3_base_score("CVSS:3.1/AV:N/AC:L/PR:L/UI:N/S:C/C:L/I:L/A:N") == 6.4
    assert cvss3_base_score("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:N/I:N/A:N") == 0.0
    assert cvss3_base_score("CVSS:3.1/AV:X/AC:L") is None
    rated = [
        ("X-C", "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H", "critical"),
        ("X-H", "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:N/A:N", "high"),
        ("X-M", "CVSS:3.1/AV:L/AC:L/PR:N/UI:R/S:U/C:H/I:N/A:N", "moderate"),
        ("X-L", "CVSS:3.1/AV:P/AC:H/PR:H/UI:R/S:U/C:L/I:N/A:N", "low"),
        ("X-4", "CVSS:4.0/AV:N/AC:L/AT:N/PR:N/UI:N/VC:H/VI:H/VA:H/SC:N/SI:N/SA:N", "unknown"),
    ]
    for advisory_id, vector, _ in rated:
        entry = record(advisory_id, "pkg", [{"introduced": "0"}])
        kind = "CVSS_V4" if vector.startswith("CVSS:4.0") else "CVSS_V3"
        entry["severity"] = [{"type": kind, "score": vector}]
        write(tmp_path, f"{advisory_id}.json", entry)
    findings, _ = load_advisories(tmp_path).match({"pkg": "1"})
    assert {f.advisory_id: f.severity for f in findings} == {i: s for i, _, s in rated}
    assert [f.advisory_id for f in findings][:2] == ["X-4", "X-C"]  # unknown sorts first


# --- edgepack audit ---------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two real bundles: one built with an affected onnx, one with patched tools."""
    root = tmp_path_factory.mktemp("bundles")
    write_linear_model(root / "model", size=8)
    signer = ProducerKeySigner(generate_signing_key())
    recipients = [generate_recipient_key().public_key()]
    made = {}
    for label, tools in (
        ("old", {"edgepack": "0.1.0", "onnx": "1.20.1", "onnxruntime": "1.19.2"}),
        ("new", {"edgepack": "0.1.0", "onnx": "1.21.0", "onnxruntime": "1.22.0"}),
    ):
        result = pack(
            root / "model",
            root / label,
            name="linear",
            version="1.0.0",
            recipients=recipients,
            signer=signer,
            provenance={"source_digest": "sha256:" + "0" * 64, "tools": tools},
        )
        made[label] = result.path
    return made


def test_audit_reports_an_affected_onnx(
    bundles: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    old = str(bundles["old"])
    code, out, err = run(capsys, "audit", old, "--advisories", str(DATA))
    assert code == 0, err  # a moderate finding is below the default --fail-on high
    assert "GHSA-p433-9wv8-28xj" in out and "moderate" in out and "1.21.0" in out
    assert out.splitlines()[0].split() == [
        "BUNDLE", "ADVISORY", "SEVERITY", "PACKAGE", "VERSION", "FIXED", "IN",
    ]  # fmt: skip
    code, out, err = run(
        capsys, "audit", old, "--advisories", str(DATA), "--fail-on", "moderate", "--json"
    )
    assert code == 4
    report = json.loads(out)
    assert report["failing"] == 1 and report["skipped_count"] == 0 and err == ""
    (bundle,) = report["bundles"]
    assert bundle["components"]["onnx"] == "1.20.1"
    assert bundle["findings"] == [
        {
            "id": "GHSA-p433-9wv8-28xj",
            "aliases": ["CVE-2026-34447"],
            "summary": bundle["findings"][0]["summary"],
            "severity": "moderate",
            "package": "onnx",
            "version": "1.20.1",
            "fixed": ["1.21.0"],
        }
    ]


def test_audit_patched_bundle_is_clean(
    bundles: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        capsys, "audit", str(bundles["new"]), "--advisories", str(DATA), "--fail-on", "low"
    )
    assert code == 0
    assert out.startswith("no advisories affect the 3 recorded components of 1 bundle(s)")


def test_audit_high_finding_fails_by_default_and_skips_are_on_stderr(
    bundles: dict[str, Path], mirror: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(
        mirror,
        "ort.json",
        record("X-ORT", "onnxruntime", [{"introduced": "1.19"}, {"fixed": "1.20"}]),
    )
    ort = json.loads((mirror / "ort.json").read_text())
    ort["database_specific"] = {"severity": "HIGH"}
    write(mirror, "ort.json", ort)
    (mirror / "broken.json").write_text("{")
    args = ("audit", str(bundles["old"]), str(bundles["new"]), "--advisories", str(mirror))
    code, out, err = run(capsys, *args, "--json")
    assert code == 4
    report = json.loads(out)
    assert report["skipped_count"] == 1 and report["failing"] == 1
    assert [f["id"] for f in report["bundles"][0]["findings"]] == ["X-ORT", "GHSA-p433-9wv8-28xj"]
    assert report["bundles"][1]["findings"] == []
    assert err.count("\n") == 1 and "skipped" in err and "broken.json: not valid JSON" in err
    code, _, _ = run(capsys, *args, "--fail-on", "critical")
    assert code == 0


def test_audit_bad_input_exits_3(
    bundles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "audit", str(bundles["old"]), "--advisories", str(tmp_path / "no"))
    assert code == 3 and "is not a directory" in err and err.count("\n") == 1
    fake = tmp_path / "fake.epk"
    fake.write_bytes(b"not a bundle")
    code, _, err = run(capsys, "audit", str(fake), "--advisories", str(DATA))
    assert code == 3 and err.count("\n") == 1 and "Traceback" not in err
    code, _, err = run(
        capsys, "audit", str(bundles["old"]), "--advisories", str(DATA), "--fail-on", "severe"
    )
    assert code == 3 and "unknown --fail-on level" in err
