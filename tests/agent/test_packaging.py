"""The systemd unit and the snap describe the agent as documented."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_systemd_unit_runs_the_loop_confined_to_its_data_dir() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "packaging" / "edgepack-agent.service")
    service = unit["Service"]
    assert service["ExecStart"].split()[1:] == ["run", "--data-dir", "/var/lib/edgepack"]
    assert service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] == "/var/lib/edgepack"
    text = (ROOT / "packaging" / "edgepack-agent.service").read_text()
    for env in ("TMPDIR=/var/lib/edgepack/tmp", "XDG_CACHE_HOME=/var/lib/edgepack/cache"):
        assert f"Environment={env}" in text
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_snap_is_a_strict_daemon_for_both_architectures() -> None:
    text = (ROOT / "snap" / "snapcraft.yaml").read_text()
    assert re.search(r"^confinement: strict$", text, re.M)
    assert re.search(r"^  amd64:$", text, re.M) and re.search(r"^  arm64:$", text, re.M)
    assert "command: bin/edgepack-agent run --data-dir $SNAP_COMMON" in text
    assert "daemon: simple" in text
    assert "XDG_CACHE_HOME: $SNAP_COMMON/cache" in text
