"""An air-gapped device: the repository's public tree copied to a "USB stick", no HTTP at all.

The agent's offline source reads the copied directory; TUF and the bundle
checks are the same as over the network, so the stick needs no trust.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import tomllib

from tests.e2e._support import (
    AIRGAP_DEVICE,
    PROFILES,
    Releases,
    assert_predicts,
    copy_tree,
    enroll,
    init_repository,
    poll,
    promote,
    publish,
    status,
)


def test_airgapped_install_and_update_from_a_copied_directory(
    releases: Releases, tmp_path: Path
) -> None:
    keys = releases.keys
    workdir = tmp_path / "repo"
    init_repository(workdir, keys, releases.v1)
    stick = tmp_path / "usb-stick" / "edgepack"
    copy_tree(workdir / "public", stick)

    device = enroll(
        AIRGAP_DEVICE,
        tmp_path / AIRGAP_DEVICE,
        PROFILES[0],
        str(stick),  # a directory, not a URL: the offline source
        stick / "metadata" / "1.root.json",
        keys,
    )
    config = tomllib.loads((device.data / "config.toml").read_text())
    assert config["metadata_url"] == stick.as_uri() + "/metadata/", config
    assert config["targets_url"] == stick.as_uri() + "/targets/", config

    outcome = poll(device)
    assert outcome["action"] == "installed", outcome
    assert outcome["version"] == "1.0.0" and outcome["error"] is None, outcome
    v1_rev = str(outcome["revision"])
    assert device.current() == v1_rev
    assert status(device)["version"] == "1.0.0"
    assert_predicts(device, releases)

    # v3 is published upstream; the device sees it only once the stick carries it.
    publish(workdir, keys, releases.v3)
    promote(workdir, "3.0.0")
    outcome = poll(device)
    assert (outcome["action"], outcome["revision"]) == ("up-to-date", v1_rev), outcome

    copy_tree(workdir / "public", stick)
    outcome = poll(device)
    assert outcome["action"] == "installed" and outcome["version"] == "3.0.0", outcome
    assert device.current() == outcome["revision"] != v1_rev
    assert_predicts(device, releases)

    # The stick is gone: the device keeps running v3 and says its source is unreachable.
    shutil.rmtree(stick)
    outcome = poll(device)
    assert outcome["action"] == "kept" and outcome["error"], outcome
    assert status(device)["version"] == "3.0.0"
    assert_predicts(device, releases)
