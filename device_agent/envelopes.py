"""The device's key envelope: its own wrap of a release's content key, fetched through TUF.

The operators publish ``keys/NAME/VERSION/DEVICE_ID.json`` (:mod:`edgepack.envelope`)
in the ``envelopes`` role's hash bins; TUF checks the envelope's signature chain,
length and hash, and this module checks that it is this device's, for this very
release and bundle, sealed to this device's key, then opens it. The caller (the
agent's download) falls back to the bundle's own recipient list when there is no
envelope at all (``None``); any envelope that is not right is an
:class:`~device_agent.errors.EnvelopeError` and nothing is installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from device_agent._crashpoint import crashpoint
from device_agent.errors import EnvelopeError
from edgepack import envelope as env
from edgepack.crypto import WrappedKey, recipient_key_id, unwrap_key
from edgepack.errors import BundleFormatError, DecryptionError, VerificationError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import x25519

    from device_agent.tufclient import TufClient


def fetch_content_key(
    client: TufClient,
    *,
    device_id: str,
    name: str,
    version: str,
    profile: str | None,
    bundle_sha256: str,
    info: bytes,
    recipient_key: x25519.X25519PrivateKey,
) -> bytes | None:
    """This device's content key for one bundle, from its envelope; ``None`` when it has none.

    ``info`` is the bundle's HPKE info (:func:`edgepack.bundle.metadata.hpke_info`),
    so the key opens only for this bundle's identity and stream parameters. Raises
    :class:`EnvelopeError` for an envelope of another device, key, release or bundle
    (a replay from an older release included) or one that does not open; tuf's own
    errors when the repository cannot be read.
    """
    path = env.envelope_target_path(name, version, device_id)
    if client.target_info(path) is None:
        return None
    data = client.small_target(path, env.MAX_ENVELOPE_BYTES)
    if data is None:
        return None
    crashpoint("envelope-fetched")
    try:
        envelope = env.parse_envelope(data)
    except BundleFormatError as exc:
        raise EnvelopeError(f"the key envelope {path} is malformed: {exc.message}") from None
    _check(envelope, path, device_id, name, version, profile, bundle_sha256, recipient_key)
    try:
        return unwrap_key([WrappedKey(envelope.key_id, envelope.sealed)], recipient_key, info)
    except (DecryptionError, VerificationError):
        raise EnvelopeError(
            f"the key envelope {path} does not open with this device's key for this bundle",
            hint="the envelope was altered or made for other bundle bytes; "
            "ask the operators to run `edgepack keys wrap` again",
        ) from None


def _check(
    envelope: env.Envelope,
    path: str,
    device_id: str,
    name: str,
    version: str,
    profile: str | None,
    bundle_sha256: str,
    recipient_key: x25519.X25519PrivateKey,
) -> None:
    """Each field against what the device expects, with the one that differs named."""
    if envelope.device_id != device_id:
        raise EnvelopeError(
            f"the key envelope {path} is for device {envelope.device_id}, not this one "
            f"({device_id})",
            hint="the repository serves another device's envelope; tell the operators",
        )
    if (envelope.name, envelope.version) != (name, version):
        raise EnvelopeError(
            f"the key envelope {path} is for {envelope.name} {envelope.version}, not "
            f"{name} {version} (replayed from another release)",
            hint="tell the operators; nothing was installed",
        )
    if envelope.profile != profile or envelope.bundle_sha256 != bundle_sha256:
        raise EnvelopeError(
            f"the key envelope {path} is for another bundle of {name} {version} "
            f"(profile {envelope.profile or 'any'}, sha256 {envelope.bundle_sha256[:12]}…)",
            hint="the operators must wrap the key of the bundle the channel names",
        )
    mine = recipient_key_id(recipient_key.public_key())
    if envelope.key_id != mine:
        raise EnvelopeError(
            f"the key envelope {path} is sealed to key {envelope.key_id}, not this device's "
            f"({mine})",
            hint="the device was re-keyed since its enrolment record was wrapped for; "
            "register the new record and wrap again",
        )
