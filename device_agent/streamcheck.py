"""Check a bundle while it downloads: its container, its content key, every segment's tag.

:class:`StreamCheck` is fed the bundle's bytes in order — the resumed prefix
read back from disk first, then the bytes as they arrive — beside TUF's
length and hash. It parses the first ustar member (``meta/encryption.json``)
as soon as it is complete and asks for the content key then, so a device
with no key for a release (no recipient entry and no key envelope: a revoked
device) stops after a few kilobytes instead of after the whole download. It
then opens each AES-256-GCM segment of ``payload.enc`` as it completes: a
bundle whose segments fail their tags is known bad before the switch is ever
considered. Plaintext is thrown away segment by segment, so memory stays at
one segment whatever the bundle's size.

A failure of the stream (bad container, bad tag) is not raised at once: the
download finishes, and only when TUF's hash matches does the failure count
against the bundle (a transport error gives a hash mismatch and a retry; a
bundle that the repository signed with a bad payload is refused for good).
The one failure raised at once is :class:`NoKeyError`: there is no point in
downloading a payload this device cannot open.
"""

from __future__ import annotations

from collections.abc import Callable

from device_agent._crashpoint import crashpoint
from edgepack.bundle import _container
from edgepack.bundle.metadata import (
    DEFAULT_LIMITS,
    META_ENCRYPTION,
    PAYLOAD,
    EncryptionHeader,
    parse_encryption_json,
)
from edgepack.crypto import TAG_SIZE, StreamOpener
from edgepack.errors import EdgepackError

BLOCK = 512

KeyProvider = Callable[[EncryptionHeader], bytes]
"""Given the bundle's encryption header, the content key (or raise :class:`NoKeyError`)."""


class StreamCheck:
    """A hasher-like observer (``update(bytes)``) of a bundle download."""

    def __init__(self, key_provider: KeyProvider) -> None:
        self._key_provider = key_provider
        self._buf = bytearray()
        self._pos = 0  # bytes of the stream consumed
        self._stage = "enc-header"
        self._need = BLOCK
        self._enc_size = 0
        self._payload_left = 0
        self._segment = 0
        self._seg_size = 0
        self._segments = 0
        self._opener: StreamOpener | None = None
        self._plain = bytearray()
        self.content_key: bytes | None = None
        self.header: EncryptionHeader | None = None
        self.problem: str | None = None
        self.segments_checked = 0

    @property
    def payload_checked(self) -> bool:
        """True once every segment of the payload opened with its tag."""
        return self.problem is None and self._stage == "after-payload"

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Consume the next bytes of the bundle."""
        if self.problem is not None or self._stage == "after-payload":
            return
        self._buf += data
        try:
            self._drain()
        except NoKeyError:
            raise
        except EdgepackError as exc:
            self._fail(exc.diagnostics())

    def _fail(self, why: str) -> None:
        self.problem = why
        self._buf = bytearray()

    def _take(self, n: int) -> bytes | None:
        if len(self._buf) < n:
            return None
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self._pos += n
        return out

    def _drain(self) -> None:
        while self.problem is None:
            if self._stage == "enc-header":
                block = self._take(BLOCK)
                if block is None:
                    return
                member = _container.parse_header(block, 0)
                if member is None or member.name != META_ENCRYPTION:
                    raise _BadStreamError("the bundle does not begin with meta/encryption.json")
                if member.size > DEFAULT_LIMITS.max_encryption_json:
                    raise _BadStreamError("meta/encryption.json is larger than its bound")
                self._enc_size = member.size
                self._stage = "enc-data"
            elif self._stage == "enc-data":
                raw = self._take(self._enc_size + _container.padding(self._enc_size))
                if raw is None:
                    return
                self.header = parse_encryption_json(raw[: self._enc_size], DEFAULT_LIMITS)
                self.content_key = self._key_provider(self.header)
                crashpoint("stream-key")
                self._opener = StreamOpener(self.content_key, self.header.nonce_prefix)
                self._seg_size = self.header.segment_size + TAG_SIZE
                self._stage = "payload-header"
            elif self._stage == "payload-header":
                block = self._take(BLOCK)
                if block is None:
                    return
                member = _container.parse_header(block, 0)
                if member is None or member.name != PAYLOAD:
                    raise _BadStreamError("payload.enc does not follow meta/encryption.json")
                self._payload_left = member.size
                self._segments = max(1, -(-member.size // self._seg_size))
                if member.size < TAG_SIZE:
                    raise _BadStreamError("payload.enc is shorter than one sealed segment")
                self._stage = "payload"
            elif self._stage == "payload":
                want = min(self._seg_size, self._payload_left)
                sealed = self._take(want)
                if sealed is None:
                    return
                assert self._opener is not None
                last = self._segment == self._segments - 1
                if len(self._plain) < want - TAG_SIZE:
                    self._plain = bytearray(want - TAG_SIZE)
                try:
                    self._opener.open(sealed, self._plain, last=last)
                except EdgepackError:
                    raise _BadStreamError(
                        f"segment {self._segment} of payload.enc fails authentication"
                    ) from None
                self._segment += 1
                self.segments_checked = self._segment
                self._payload_left -= want
                crashpoint("stream-segment")
                if self._payload_left == 0:
                    self._stage = "after-payload"
                    self._buf = bytearray()
                    self._plain = bytearray()
                    return


class _BadStreamError(EdgepackError):
    """The stream is not a well-formed, authentic bundle payload."""


class NoKeyError(EdgepackError):
    """This device holds no key for the release: not in the bundle, no envelope for it.

    Not a verdict on the release (its envelope may be published later), but like a
    bundle not encrypted for the device it is a decryption problem: exit code 4."""

    exit_code = 4
