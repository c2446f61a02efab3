"""Errors by cause, each able to explain itself to a person.

The CLI catches :class:`EdgepackError` once, prints :meth:`EdgepackError.diagnostics`
as one line and exits with :attr:`EdgepackError.exit_code`. Nothing below the CLI
calls ``sys.exit``.

Exit codes (documented in docs/cli.md):

====  ==========================================================
 1    any other failure
 2    bad usage (unknown option, missing argument)
 3    bad input: a file that is not what it claims, bad data
 4    verification failed: signature, decryption, digest, policy
 5    key problem: missing, wrong kind, loose permissions, passphrase
 6    conflict: try again (lock held, concurrent publish)
 7    transport: network or repository unreachable
====  ==========================================================
"""

from __future__ import annotations


class EdgepackError(Exception):
    """Base of every error edgepack raises on purpose."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def diagnostics(self) -> str:
        """One line for a person: what went wrong and, when known, what to do."""
        if self.hint:
            return f"{self.message}; {self.hint}"
        return self.message


class InvalidInputError(EdgepackError):
    """Input data is malformed, oversize or not what it claims to be."""

    exit_code = 3


class BundleFormatError(InvalidInputError):
    """A file is not a well-formed edgepack bundle."""


class VerificationError(EdgepackError):
    """A signature, digest, decryption or trust-policy check failed."""

    exit_code = 4


class DecryptionError(VerificationError):
    """The payload could not be decrypted.

    Deliberately opaque: every cause (wrong key, flipped byte, truncation,
    reordering) gives the same message, so nothing leaks which check failed.
    """

    def __init__(self) -> None:
        super().__init__(
            "cannot decrypt the bundle payload: wrong recipient key, or the bundle was "
            "altered or truncated",
            hint="check that the bundle was encrypted for this key and re-download it",
        )


class KeyFileError(EdgepackError):
    """A key file is missing, of the wrong kind, too readable, or its passphrase is wrong."""

    exit_code = 5


class ConflictError(EdgepackError):
    """Another writer holds the lock or moved the state under us; retrying is safe."""

    exit_code = 6


class TransportError(EdgepackError):
    """The network or the repository could not be reached."""

    exit_code = 7
