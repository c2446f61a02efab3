"""A release with no bundle for the device says which profiles it was published for.

A generic PC detects as ``generic-x86_64``; a release published only for
``intel-nuc`` and ``raspberry-pi-4`` has nothing for it. The poll must say so
in words an operator can act on: the profiles (with their architectures) the
release has, and what to do — enrol with a fitting profile, or publish a
variant for this one. Real repository, real server, real enrolment.
"""

from __future__ import annotations

from pathlib import Path

from device_agent import enroll as enroll_mod
from edgepack import channel as ch
from tests.agent._support import MODEL, World, fast_limits
from tests.agent.conftest import poll


def publish_for(world: World, version: str, profiles: dict[str, str]) -> None:
    """Promote ``version`` to stable with one variant per profile (profile → architecture)."""
    path = world.make_bundle(version, 2.0)
    target = world.repo.add_bundle(path, version)
    variants = {profile: ch.Variant(target, arch) for profile, arch in profiles.items()}
    world.repo.set_channel(ch.promote(world.repo.doc, ch.Release(version, 100.0, (), variants)))


def enroll_as(world: World, data: Path, profile: str) -> None:
    enroll_mod.enroll(
        data,
        repo_url=world.server.url,
        root=world.root_json,
        models=[MODEL],
        profile=profile,
        trust=world.producer_pub,
        recipient_key=world.fleet_key_path,
        limits=fast_limits(),
    )


def test_no_variant_names_the_published_profiles_and_what_to_do(
    world: World, tmp_path: Path
) -> None:
    publish_for(world, "1.0.0", {"intel-nuc": "x86_64", "raspberry-pi-4": "aarch64"})
    data = tmp_path / "pc"
    enroll_as(world, data, "generic-x86_64")

    out = poll(data)

    assert out.action == "no-release", out
    assert out.error == (
        "no variant of digits 1.0.0 for profile generic-x86_64 on x86_64 "
        "(published: intel-nuc on x86_64, raspberry-pi-4 on aarch64); "
        "enrol with --profile intel-nuc if this device is one, "
        "or publish a variant for generic-x86_64"
    ), out.error
    line = out.describe()
    assert line.startswith("digits: no-release (no variant of digits 1.0.0 for profile "), line
    assert line.endswith("; no model running"), line
    assert not world.server.bundle_requests()  # nothing was downloaded for it


def test_no_variant_of_the_device_s_architecture_suggests_publishing_one(
    world: World, tmp_path: Path
) -> None:
    """No published profile fits the device's architecture: enrolling differently cannot help."""
    publish_for(world, "1.0.0", {"raspberry-pi-4": "aarch64"})
    data = tmp_path / "pc"
    enroll_as(world, data, "generic-x86_64")

    out = poll(data)

    assert out.action == "no-release", out
    assert out.error == (
        "no variant of digits 1.0.0 for profile generic-x86_64 on x86_64 "
        "(published: raspberry-pi-4 on aarch64); publish a variant for generic-x86_64"
    ), out.error
    assert "--profile" not in str(out.error)


def test_a_fitting_variant_still_installs(world: World, tmp_path: Path) -> None:
    """The message is only for a miss: the device's own profile is installed as before."""
    publish_for(world, "1.0.0", {"generic-x86_64": "x86_64", "raspberry-pi-4": "aarch64"})
    data = tmp_path / "pc"
    enroll_as(world, data, "generic-x86_64")

    out = poll(data)

    assert out.action == "installed" and out.error is None, out
