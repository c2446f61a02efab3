"""Hardware detection over the files captured from each board kind, and bundle refusal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from device_agent import cli_detect
from device_agent.hwdetect import (
    HardwareMismatchError,
    MachineFacts,
    check_bundle_compatible,
    choose_profile,
    detect,
    normalize_architecture,
    parse_cpuinfo,
    read_machine_facts,
)
from edgepack.cli import app as edgepack_app
from edgepack.errors import InvalidInputError
from edgepack.hw import HardwareProfile, list_profiles

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# fixture directory -> (profile detection must choose, how it matched)
EXPECTED = {
    "raspberry-pi-4": ("raspberry-pi-4", "board 'Raspberry Pi 4'"),
    "raspberry-pi-5": ("raspberry-pi-5", "board 'Raspberry Pi 5'"),
    "jetson-orin-nano": ("jetson-orin-nano", "board 'Jetson Orin Nano'"),
    "intel-nuc": ("intel-nuc", "board 'NUC'"),
    # A NUC 8 has AVX2 but no VNNI: full-range int8 would saturate, so it is generic.
    "intel-nuc8": ("generic-x86_64", "fallback"),
    # A KVM guest with AVX512-VNNI is still not a NUC.
    "generic-x86-vm": ("generic-x86_64", "fallback"),
    # Neoverse-N1 has asimddp like a Pi 5, but features alone never pick a board profile.
    "unknown-aarch64-server": ("generic-aarch64", "fallback"),
}


@pytest.fixture(scope="module")
def profiles() -> list[HardwareProfile]:
    return list_profiles()


def facts_of(board: str) -> MachineFacts:
    return read_machine_facts(FIXTURES / board)


def test_every_fixture_is_covered() -> None:
    assert {p.name for p in FIXTURES.iterdir()} == set(EXPECTED)


@pytest.mark.parametrize("board", sorted(EXPECTED))
def test_detection_per_board(board: str, profiles: list[HardwareProfile]) -> None:
    detection = detect(facts_of(board), profiles)
    profile, how = EXPECTED[board]
    assert detection.profile.name == profile
    assert detection.matched_by == how
    assert detection.reasons[0].startswith(f"{profile}: ")


def test_facts_read_from_a_raspberry_pi_4() -> None:
    facts = facts_of("raspberry-pi-4")
    assert facts.machine == "aarch64"
    assert facts.device_tree_model == "Raspberry Pi 4 Model B Rev 1.4"  # NUL stripped
    assert facts.dmi_product_name is None
    assert facts.memory_mb == 3791
    cpu = facts.cpu
    assert cpu.processors == 4
    assert cpu.cores == ("Cortex-A72",)
    assert cpu.features == {"fp", "asimd", "evtstrm", "crc32", "cpuid"}
    assert cpu.board_model == "Raspberry Pi 4 Model B Rev 1.4"


def test_x86_flags_and_arm_features_are_both_parsed() -> None:
    nuc = facts_of("intel-nuc").cpu
    assert {"avx2", "avx512_vnni", "fma"} <= nuc.features
    assert nuc.model_name == "11th Gen Intel(R) Core(TM) i5-1135G7 @ 2.40GHz"
    assert nuc.processors == 8
    orin = facts_of("jetson-orin-nano").cpu
    assert "asimddp" in orin.features and orin.cores == ("Cortex-A78AE",)
    assert orin.processors == 6
    server = facts_of("unknown-aarch64-server").cpu
    assert server.processors == 80 and server.cores == ("Neoverse-N1",)


def test_features_are_those_of_every_core() -> None:
    text = (
        "processor\t: 0\nFeatures\t: fp asimd asimddp\nCPU part\t: 0xd0b\n\n"
        "processor\t: 1\nFeatures\t: fp asimd\nCPU part\t: 0xd05\n"
    )
    cpu = parse_cpuinfo(text)
    assert cpu.features == {"fp", "asimd"}
    assert cpu.cores == ("Cortex-A76", "Cortex-A55")


@pytest.mark.parametrize(
    ("name", "canonical"),
    [("arm64", "aarch64"), ("AARCH64", "aarch64"), ("amd64", "x86_64"), ("x86_64", "x86_64")],
)
def test_architecture_names_are_normalised(name: str, canonical: str) -> None:
    assert normalize_architecture(name) == canonical


def test_arm64_spelling_detects_like_aarch64(profiles: list[HardwareProfile]) -> None:
    facts = facts_of("raspberry-pi-5")
    renamed = MachineFacts("arm64", facts.cpuinfo, facts.device_tree_model, None, None)
    assert detect(renamed, profiles).profile.name == "raspberry-pi-5"


def test_board_without_its_required_features_falls_back(profiles: list[HardwareProfile]) -> None:
    pi4 = facts_of("raspberry-pi-4")
    # A Pi 5 model string over a Cortex-A72 cpuinfo (no asimddp): not trusted as a Pi 5.
    cores_only = pi4.cpuinfo.split("\nHardware")[0]
    fake = MachineFacts("aarch64", cores_only, "Raspberry Pi 5 Model B Rev 1.0")
    detection = detect(fake, profiles)
    assert detection.profile.name == "generic-aarch64"
    assert "raspberry-pi-5: CPU lacks asimddp" in detection.reasons


def test_board_model_from_cpuinfo_when_device_tree_is_hidden(
    profiles: list[HardwareProfile],
) -> None:
    # Containers often hide /proc/device-tree; Raspberry Pi kernels repeat it in cpuinfo.
    pi4 = facts_of("raspberry-pi-4")
    hidden = MachineFacts("aarch64", pi4.cpuinfo)
    assert detect(hidden, profiles).profile.name == "raspberry-pi-4"


def test_unsupported_architecture_is_refused(profiles: list[HardwareProfile]) -> None:
    with pytest.raises(HardwareMismatchError, match="unsupported architecture 'riscv64'"):
        detect(MachineFacts("riscv64", ""), profiles)


def test_missing_generic_profile_is_explained(profiles: list[HardwareProfile]) -> None:
    without_generic = [p for p in profiles if p.name != "generic-aarch64"]
    with pytest.raises(HardwareMismatchError, match="no generic-aarch64 profile"):
        detect(facts_of("unknown-aarch64-server"), without_generic)


def test_choose_profile_by_name_checks_the_machine(profiles: list[HardwareProfile]) -> None:
    pi4 = facts_of("raspberry-pi-4")
    chosen = choose_profile("generic-aarch64", facts=pi4, profiles=profiles)
    assert chosen.profile.name == "generic-aarch64" and chosen.matched_by == "requested"
    with pytest.raises(HardwareMismatchError, match="is for x86_64, this machine is aarch64"):
        choose_profile("intel-nuc", facts=pi4, profiles=profiles)
    with pytest.raises(HardwareMismatchError, match="needs CPU features asimddp"):
        choose_profile("raspberry-pi-5", facts=pi4, profiles=profiles)
    with pytest.raises(InvalidInputError, match="unknown hardware profile 'pi'"):
        choose_profile("pi", facts=pi4, profiles=profiles)
    assert choose_profile("auto", facts=pi4, profiles=profiles).profile.name == "raspberry-pi-4"


def test_matching_bundles_are_accepted(profiles: list[HardwareProfile]) -> None:
    pi5 = detect(facts_of("raspberry-pi-5"), profiles)
    check_bundle_compatible("raspberry-pi-5", ["aarch64"], pi5)
    check_bundle_compatible("generic-aarch64", ["arm64"], pi5)
    check_bundle_compatible(None, ["aarch64"], pi5)
    check_bundle_compatible("any", ["any"], pi5)


def test_bundle_for_a_pi_5_is_refused_on_an_x86_box(profiles: list[HardwareProfile]) -> None:
    nuc = detect(facts_of("intel-nuc"), profiles)
    with pytest.raises(HardwareMismatchError) as info:
        check_bundle_compatible("raspberry-pi-5", ["aarch64"], nuc)
    text = info.value.diagnostics()
    assert "bundle is for aarch64 but this device is intel-nuc (NUC11TNHi5, x86_64)" in text
    assert "x86_64 variant" in text


def test_aarch64_bundle_without_profile_is_refused_on_x86(
    profiles: list[HardwareProfile],
) -> None:
    vm = detect(facts_of("generic-x86-vm"), profiles)
    with pytest.raises(HardwareMismatchError, match="bundle is for aarch64"):
        check_bundle_compatible(None, ["aarch64"], vm)


def test_bundle_for_another_board_of_the_same_arch_is_refused(
    profiles: list[HardwareProfile],
) -> None:
    pi4 = detect(facts_of("raspberry-pi-4"), profiles)
    with pytest.raises(HardwareMismatchError) as info:
        check_bundle_compatible("jetson-orin-nano", ["aarch64"], pi4)
    assert "profile 'jetson-orin-nano' but this device is raspberry-pi-4" in str(info.value)
    assert "install the raspberry-pi-4 variant" in info.value.diagnostics()


def test_fixture_root_needs_its_architecture(tmp_path: Path) -> None:
    shutil.copytree(FIXTURES / "raspberry-pi-4", tmp_path / "pi", dirs_exist_ok=True)
    (tmp_path / "pi/proc/sys/kernel/arch").unlink()
    with pytest.raises(InvalidInputError, match="no proc/sys/kernel/arch"):
        read_machine_facts(tmp_path / "pi")


def test_this_machine_is_detected(profiles: list[HardwareProfile]) -> None:
    detection = detect(read_machine_facts(), profiles)
    assert detection.profile.architecture == detection.architecture


def _agent_app() -> typer.Typer:
    app = typer.Typer(rich_markup_mode=None)

    @app.callback()
    def _root() -> None:
        """Stand-in for the agent's root app (detect is one command among several)."""

    cli_detect.register(app)
    return app


def test_agent_detect_json_on_a_captured_pi_4() -> None:
    root = FIXTURES / "raspberry-pi-4"
    result = CliRunner().invoke(_agent_app(), ["detect", "--root", str(root), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["profile"] == "raspberry-pi-4"
    assert data["architecture"] == "aarch64"
    assert data["device_tree_model"] == "Raspberry Pi 4 Model B Rev 1.4"
    assert data["cpu"]["cores"] == ["Cortex-A72"]
    assert data["memory_mb"] == 3791


def test_agent_detect_human_explains_the_fallback() -> None:
    root = FIXTURES / "intel-nuc8"
    result = CliRunner().invoke(_agent_app(), ["detect", "--root", str(root)])
    assert result.exit_code == 0, result.output
    assert "generic-x86_64 (fallback)" in result.stdout
    assert "intel-nuc: CPU lacks avx512_vnni|avx_vnni" in result.stdout


def test_edgepack_hw_list_json() -> None:
    result = CliRunner().invoke(edgepack_app, ["hw", "list", "--json"])
    assert result.exit_code == 0, result.output
    names = [p["name"] for p in json.loads(result.stdout)["profiles"]]
    assert {"raspberry-pi-4", "intel-nuc", "generic-x86_64"} <= set(names)


def test_edgepack_hw_show(capsys: pytest.CaptureFixture[str]) -> None:
    from edgepack.cli import main

    assert main(["hw", "show", "jetson-orin-nano", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["architecture"] == "aarch64"
    assert data["execution_providers"][0] == "CPUExecutionProvider"
    assert main(["hw", "show", "raspberry-pi-3"]) == 3
    err = capsys.readouterr().err
    assert "unknown hardware profile 'raspberry-pi-3'; known profiles:" in err
