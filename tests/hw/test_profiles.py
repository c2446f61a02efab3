"""Hardware profiles: the shipped files load, and every kind of mistake is refused clearly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edgepack import hw
from edgepack.errors import InvalidInputError

SHIPPED = Path(__file__).resolve().parents[2] / "hw" / "profiles"
REQUIRED = {
    "raspberry-pi-4",
    "raspberry-pi-5",
    "jetson-orin-nano",
    "generic-aarch64",
    "intel-nuc",
    "generic-x86_64",
}


def test_shipped_profiles_load_and_are_complete(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(hw.ENV_DIR, raising=False)
    profiles = {p.name: p for p in hw.list_profiles()}
    assert set(profiles) >= REQUIRED
    for arch in hw.ARCHITECTURES:
        generic = profiles[f"generic-{arch}"]
        assert generic.is_generic and generic.board_models == ()
    for profile in profiles.values():
        assert profile.execution_providers[0] == "CPUExecutionProvider"
        assert profile.quantization.weight_type in ("int8", "uint8")


def test_profiles_suit_their_cpus() -> None:
    pi4 = hw.load_profile("raspberry-pi-4")
    assert pi4.architecture == "aarch64" and pi4.memory_mb == 4096
    assert "asimd" in pi4.cpu_features and "asimddp" not in pi4.cpu_features
    assert "asimddp" in hw.load_profile("raspberry-pi-5").required_features
    orin = hw.load_profile("jetson-orin-nano")
    assert orin.memory_mb == 8192 and "asimddp" in orin.cpu_features
    nuc = hw.load_profile("intel-nuc")
    assert nuc.architecture == "x86_64" and "avx2" in nuc.required_features
    assert nuc.quantization.reduce_range is False
    # Without VNNI, full-range int8 weights can saturate onnxruntime's AVX2 kernels.
    assert hw.load_profile("generic-x86_64").quantization.reduce_range is True


def test_profile_round_trips_to_dict() -> None:
    profile = hw.load_profile("raspberry-pi-4")
    data = profile.to_dict()
    assert data["match"]["board_models"][0] == "Raspberry Pi 4"
    assert data["quantization"]["recipe"] == "dynamic"
    assert data["health"] == {"latency_ms": 500.0, "memory_mb": 512.0}


def test_unknown_profile_lists_the_known_ones() -> None:
    with pytest.raises(InvalidInputError) as info:
        hw.load_profile("raspberry-pi-9")
    text = info.value.diagnostics()
    assert "unknown hardware profile 'raspberry-pi-9'" in text
    assert "generic-aarch64" in text and "intel-nuc" in text


@pytest.mark.parametrize("name", ["../etc/passwd", "Raspberry", "", "a/b"])
def test_profile_names_cannot_escape_the_directory(name: str) -> None:
    with pytest.raises(InvalidInputError, match="invalid hardware profile name"):
        hw.load_profile(name)


def test_env_directory_takes_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(SHIPPED / "generic-x86_64.toml", tmp_path / "generic-x86_64.toml")
    monkeypatch.setenv(hw.ENV_DIR, str(tmp_path))
    assert hw.profiles_dir() == tmp_path
    assert [p.name for p in hw.list_profiles()] == ["generic-x86_64"]
    monkeypatch.setenv(hw.ENV_DIR, str(tmp_path / "missing"))
    with pytest.raises(InvalidInputError, match="is not a directory"):
        hw.profiles_dir()


def _write_variant(tmp_path: Path, old: str, new: str, name: str = "raspberry-pi-4") -> Path:
    text = (SHIPPED / f"{name}.toml").read_text()
    assert old in text, old
    path = tmp_path / f"{name}.toml"
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("memory_mb = 4096", 'memory_mb = 4096\ncolour = "red"', "unknown key(s) colour"),
        (
            "per_channel = true",
            "per_channel = true\nsymmetric = true",
            "unknown key(s) quantization.symmetric",
        ),
        ("latency_ms = 500.0\n", "", "missing key(s) health.latency_ms"),
        ('architecture = "aarch64"', 'architecture = "armv7l"', "unknown architecture 'armv7l'"),
        ('recipe = "dynamic"', 'recipe = "int4"', "unknown quantization.recipe 'int4'"),
        ('weight_type = "int8"', 'weight_type = "float8"', "unknown quantization.weight_type"),
        ("memory_mb = 4096", 'memory_mb = "4 GB"', "memory_mb must be a positive integer"),
        ("memory_mb = 4096", "memory_mb = true", "memory_mb must be a positive integer"),
        ("per_channel = true", "per_channel = 1", "per_channel must be true or false"),
        ("min_cosine = 0.99", "min_cosine = 1.5", "min_cosine must be at most 1.0"),
        ("latency_ms = 500.0", "latency_ms = -1.0", "latency_ms must be a positive finite"),
        ("latency_ms = 500.0", "latency_ms = inf", "latency_ms must be a positive finite"),
        ("cpu_features = [", 'cpu_features = ["NEON", ', "is not a CPU feature name"),
        ("cpu_features = [", 'cpu_features = ["asimd", ', "cpu_features has duplicates"),
        (
            'execution_providers = ["CPUExecutionProvider"]',
            'execution_providers = ["CUDAExecutionProvider"]',
            "lacks 'CPUExecutionProvider'",
        ),
        (
            'execution_providers = ["CPUExecutionProvider"]',
            'execution_providers = ["CPU"]',
            "not an onnxruntime execution provider",
        ),
        (
            'execution_providers = ["CPUExecutionProvider"]',
            'execution_providers = "CPU"',
            "execution_providers must be a list of strings",
        ),
        ('name = "raspberry-pi-4"', 'name = "raspberry-pi-400"', "differs from the file name"),
        ("[health]", "health = 3\n[unused]", "unknown key(s) unused"),
        ("memory_mb = 4096", "memory_mb = 4096\nmemory_mb = 1", "is not valid TOML"),
    ],
)
def test_invalid_profiles_are_refused(tmp_path: Path, old: str, new: str, message: str) -> None:
    path = _write_variant(tmp_path, old, new)
    with pytest.raises(InvalidInputError) as info:
        hw.load_profile_file(path)
    assert message in info.value.diagnostics()


def test_generic_profile_cannot_name_boards(tmp_path: Path) -> None:
    path = _write_variant(
        tmp_path, "board_models = []", 'board_models = ["Raspberry Pi"]', name="generic-aarch64"
    )
    with pytest.raises(InvalidInputError, match=r"must have empty match\.board_models"):
        hw.load_profile_file(path)


def test_one_bad_profile_fails_the_listing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(SHIPPED / "generic-x86_64.toml", tmp_path / "generic-x86_64.toml")
    (tmp_path / "broken.toml").write_text("name = 'broken'\n")
    monkeypatch.setenv(hw.ENV_DIR, str(tmp_path))
    with pytest.raises(InvalidInputError, match=r"broken\.toml: missing key"):
        hw.list_profiles()
