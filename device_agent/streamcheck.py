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

import hashlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from device_agent._crashpoint import crashpoint
from edgepack.bundle import _container
from edgepack.bundle._pieces import hash_pieces
from edgepack.bundle.metadata import (
    DEFAULT_LIMITS,
    META_ENCRYPTION,
    PAYLOAD,
    EncryptionHeader,
    parse_encryption_json,
)
from edgepack.crypto import TAG_SIZE, StreamOpener, ciphertext_size
from edgepack.errors import EdgepackError

BLOCK = 512

KeyProvider = Callable[[EncryptionHeader], bytes]
"""Given the bundle's encryption header, the content key (or raise :class:`NoKeyError`)."""


class StreamCheck:
    """A hasher-like observer (``update(bytes)``) of a bundle download.

    ``files`` — the payload's files as (path, size) in manifest order, when the
    repository's TUF metadata names them — lets it also hash each plaintext file
    while the bytes arrive (in a worker thread: hashlib releases the GIL), so the
    signed manifest's digests are checked without reading the bundle again.
    """

    def __init__(
        self, key_provider: KeyProvider, files: Sequence[tuple[str, int]] | None = None
    ) -> None:
        self._key_provider = key_provider
        self._files = list(files) if files is not None else None
        self._buf = bytearray()
        self._start = 0  # where the unread bytes of _buf begin
        self._stage = "enc-header"
        self._enc_size = 0
        self._payload_left = 0
        self._segment = 0
        self._seg_size = 0
        self._segments = 0
        self._opener: StreamOpener | None = None
        self._plains = [bytearray(), bytearray()]
        self._pending: list[Future[None] | None] = [None, None]
        self._pool: ThreadPoolExecutor | None = None
        self._hashers: list[object] = []
        self._file_index = 0
        self._file_left = 0
        self.content_key: bytes | None = None
        self.header: EncryptionHeader | None = None
        self.problem: str | None = None
        self.segments_checked = 0
        self.digests: dict[str, str] | None = None  # path -> sha256, once the payload is in

    @property
    def payload_checked(self) -> bool:
        """True once every segment of the payload opened with its tag."""
        return self.problem is None and self._stage == "after-payload"

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Consume the next bytes of the bundle."""
        if self.problem is not None or self._stage == "after-payload":
            return
        if self._start and self._start >= len(self._buf) // 2:
            del self._buf[: self._start]  # compact: at most one chunk is ever moved
            self._start = 0
        self._buf += data
        try:
            self._drain()
        except NoKeyError:
            self.close()
            raise
        except EdgepackError as exc:
            self._fail(exc.diagnostics())

    def close(self) -> None:
        """Stop the hashing thread (the download ended or was cut)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _fail(self, why: str) -> None:
        self.problem = why
        self._buf = bytearray()
        self._start = 0
        self.close()

    def _take(self, n: int) -> memoryview | None:
        if len(self._buf) - self._start < n:
            return None
        view = memoryview(self._buf)[self._start : self._start + n]
        self._start += n
        return view

    def _drain(self) -> None:
        while self.problem is None:
            if self._stage == "enc-header":
                block = self._take(BLOCK)
                if block is None:
                    return
                member = _container.parse_header(bytes(block), 0)
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
                self.header = parse_encryption_json(bytes(raw[: self._enc_size]), DEFAULT_LIMITS)
                self.content_key = self._key_provider(self.header)
                crashpoint("stream-key")
                self._opener = StreamOpener(self.content_key, self.header.nonce_prefix)
                self._seg_size = self.header.segment_size + TAG_SIZE
                self._stage = "payload-header"
            elif self._stage == "payload-header":
                block = self._take(BLOCK)
                if block is None:
                    return
                member = _container.parse_header(bytes(block), 0)
                if member is None or member.name != PAYLOAD:
                    raise _BadStreamError("payload.enc does not follow meta/encryption.json")
                if member.size < TAG_SIZE:
                    raise _BadStreamError("payload.enc is shorter than one sealed segment")
                self._payload_left = member.size
                self._segments = max(1, -(-member.size // self._seg_size))
                self._start_hashing(member.size)
                self._stage = "payload"
            elif self._stage == "payload":
                want = min(self._seg_size, self._payload_left)
                sealed = self._take(want)
                if sealed is None:
                    return
                self._open_segment(sealed, want)
                if self._payload_left == 0:
                    self._finish()
                    return

    def _start_hashing(self, payload_size: int) -> None:
        if self._files is None:
            return
        assert self.header is not None
        plain = sum(size for _, size in self._files)
        if ciphertext_size(plain, self.header.segment_size) != payload_size:
            raise _BadStreamError("payload.enc's size does not match the files TUF names")
        self._hashers = [hashlib.sha256() for _ in self._files]
        self._file_left = self._files[0][1] if self._files else 0
        self._pool = ThreadPoolExecutor(max_workers=1)

    def _open_segment(self, sealed: memoryview, want: int) -> None:
        assert self._opener is not None
        slot = self._segment % 2
        previous = self._pending[slot]
        if previous is not None:
            previous.result()  # that buffer's bytes are hashed: it may be reused
        if len(self._plains[slot]) < want - TAG_SIZE:
            self._plains[slot] = bytearray(want - TAG_SIZE)
        last = self._segment == self._segments - 1
        try:
            plain = self._opener.open(sealed, self._plains[slot], last=last)
        except EdgepackError:
            raise _BadStreamError(
                f"segment {self._segment} of payload.enc fails authentication"
            ) from None
        if self._pool is not None:
            self._pending[slot] = self._pool.submit(hash_pieces, self._hashers, self._split(plain))
        self._segment += 1
        self.segments_checked = self._segment
        self._payload_left -= want
        crashpoint("stream-segment")

    def _split(self, plain: memoryview) -> list[tuple[int, memoryview]]:
        """Cut a segment's plaintext into per-file pieces."""
        assert self._files is not None
        pieces = []
        offset = 0
        while offset < len(plain):
            while self._file_left == 0 and self._file_index < len(self._files) - 1:
                self._file_index += 1
                self._file_left = self._files[self._file_index][1]
            if self._file_left == 0:
                raise _BadStreamError("payload.enc holds more than the files TUF names")
            take = min(self._file_left, len(plain) - offset)
            pieces.append((self._file_index, plain[offset : offset + take]))
            offset += take
            self._file_left -= take
        return pieces

    def _finish(self) -> None:
        self._stage = "after-payload"
        for future in self._pending:
            if future is not None:
                future.result()
        self.close()
        if self._files is not None:
            self.digests = {
                path: h.hexdigest()  # type: ignore[attr-defined]
                for (path, _), h in zip(self._files, self._hashers, strict=True)
            }
        self._buf = bytearray()
        self._start = 0
        self._plains = [bytearray(), bytearray()]


class _BadStreamError(EdgepackError):
    """The stream is not a well-formed, authentic bundle payload."""


class NoKeyError(EdgepackError):
    """This device holds no key for the release: not in the bundle, no envelope for it.

    Not a verdict on the release (its envelope may be published later), but like a
    bundle not encrypted for the device it is a decryption problem: exit code 4."""

    exit_code = 4
