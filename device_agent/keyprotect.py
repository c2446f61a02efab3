"""The device's keys at rest: the storage key and the recipient key, in files or sealed by a TPM.

An installed revision keeps the bundle's ciphertext (``device_agent.atrest``); its
content key is sealed with the device's **storage key**, 32 random bytes made once
per data directory. Applications that load models need the storage key, never the
device's **recipient key** (X25519, which opens new releases and stays the agent's
alone).

Protection ``file``: ``DATA/models/.storage.key``, mode 0440 (the agent's user and
the applications' group), and the recipient key a PEM file, mode 0600, in the 0700
``DATA/keys``. It protects a revision folder copied on its own (a backup, a support
bundle) and keeps the keys from other users of a running device; not a stolen disk:
the keys lie on the same disk.

Protection ``tpm``: each key is a TPM 2.0 *sealed data object* under a primary key
the TPM derives from its owner seed, which never leaves the chip. What stays on disk
is only the sealed blobs: ``DATA/models/.storage.key.tpm`` (0440: applications unseal
through the TPM themselves) and ``DATA/keys/device.key.tpm`` (or ``recipient.key.tpm``
for a key given with ``--recipient-key``; 0600), JSON with the object's public and
private parts in base64. The private part is encrypted and integrity-protected by
the primary key, so the blobs are useless on another machine, or after the TPM is
cleared. The seal binds the keys to the chip, not to the boot state (no PCR policy):
whoever runs code with TPM access on this very device (root, the agent's user, or a
thief who boots it into another system) can still unseal them; ``docs/agent.md``,
"Keys at rest", says what each mode protects against.

The TPM is driven through Debian's ``tpm2-tools`` (built on tpm2-tss) as
subprocesses: ``tpm2_createprimary``, ``tpm2_create`` (the secret on standard input,
never in a file), ``tpm2_load``, ``tpm2_unseal`` (the secret on standard output),
``TPM2TOOLS_TCTI`` set from ``tpm_tcti`` (default the kernel's resource manager
``device:/dev/tpmrm0``; tests use ``swtpm:host=127.0.0.1,port=PORT``). Not the pip
``tpm2-pytss``: it has no wheel and builds against ``libtss2-dev`` headers, a C
toolchain the device does not otherwise need, while ``tpm2-tools`` is one Debian
package. The context files the tools pass between steps (saved TPM contexts,
themselves encrypted by the TPM) live in a private 0700 temporary folder removed
afterwards. Without a resource manager (swtpm, ``device:/dev/tpm0``) transient
objects outlive the tool that loaded them, so each step is followed by
``tpm2_flushcontext -t``; such a TPM serves one process at a time.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import secrets
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from device_agent import _atomic
from edgepack.errors import InvalidInputError, KeyFileError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from cryptography.hazmat.primitives.asymmetric import x25519

    from device_agent.config import AgentConfig

STORAGE_KEY_SIZE = 32
STORAGE_KEY_FILE = ".storage.key"
SEALED_SUFFIX = ".tpm"
SEALED_FORMAT = "edgepack-tpm-sealed/1"
PROTECTIONS = ("file", "tpm")
DEFAULT_TCTI = "device:/dev/tpmrm0"
# One tool's run against the TPM (a real chip's ECC primary takes well under a second).
TPM_TIMEOUT_S = 30.0
MAX_SEALED_FILE = 64 * 1024
# The primary key, spelled out so the same owner seed derives the same key whatever the
# tools' default template: ECC P-256, an AES-128-CFB storage parent.
_PRIMARY_ARGS = (
    "-C",
    "o",
    "-g",
    "sha256",
    "-G",
    "ecc256:aes128cfb",
    "-a",
    "restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda",
)
# The sealed data object: bound to this TPM and this parent, no password (the blob's
# file mode and the TPM's device node decide who may unseal).
_SEALED_ATTRIBUTES = "fixedtpm|fixedparent|userwithauth|noda"
# TCTIs that put a resource manager between the tools and the TPM (objects flushed for us).
_MANAGED_TCTIS = ("device:/dev/tpmrm", "tabrmd")


def storage_key_path(data_dir: Path) -> Path:
    """Where the file-protected storage key lives (beside the revisions it opens)."""
    return data_dir / "models" / STORAGE_KEY_FILE


def sealed_storage_key_path(data_dir: Path) -> Path:
    """Where the TPM-sealed storage key lives."""
    return data_dir / "models" / (STORAGE_KEY_FILE + SEALED_SUFFIX)


def sealed_path(key_path: Path) -> Path:
    """The TPM-sealed form of the key file ``key_path`` (``device.key`` → ``device.key.tpm``)."""
    return key_path.with_name(key_path.name + SEALED_SUFFIX)


def has_storage_key(data_dir: Path) -> bool:
    """Whether the data directory already holds a storage key, in either protection."""
    return storage_key_path(data_dir).exists() or sealed_storage_key_path(data_dir).exists()


def check_protection(protection: str, tcti: str = "") -> None:
    """Refuse a protection name or TCTI string the agent could not use (bad input, exit 3)."""
    if protection not in PROTECTIONS:
        raise InvalidInputError(
            f"key protection must be one of {', '.join(PROTECTIONS)}, not {protection!r}"
        )
    if any(c < " " or c == "\x7f" for c in tcti) or tcti.startswith((":", "-")):
        raise InvalidInputError(
            f"--tpm-tcti {tcti!r} is not a TCTI",
            hint="give e.g. device:/dev/tpmrm0 or swtpm:host=127.0.0.1,port=2321",
        )


@dataclass(frozen=True)
class SealedBlob:
    """A TPM sealed data object as tpm2-tools writes it: its public and private parts.

    ``tcti`` is the TPM it was sealed by, recorded so an application that reads the
    storage key finds the same TPM without the agent's configuration.
    """

    public: bytes
    private: bytes
    tcti: str = ""

    def to_bytes(self) -> bytes:
        """The blob file's bytes (JSON)."""
        doc = {
            "format": SEALED_FORMAT,
            "public": base64.b64encode(self.public).decode(),
            "private": base64.b64encode(self.private).decode(),
            "tcti": self.tcti,
        }
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, path: Path) -> SealedBlob:
        """Parse a blob file, refusing anything that is not one."""
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != SEALED_FORMAT:
                raise ValueError("not a sealed key")
            tcti = doc.get("tcti", "")
            if not isinstance(tcti, str):
                raise ValueError("tcti is not a string")
            return cls(
                base64.b64decode(doc["public"], validate=True),
                base64.b64decode(doc["private"], validate=True),
                tcti,
            )
        except (ValueError, KeyError, TypeError, binascii.Error, RecursionError):
            raise KeyFileError(
                f"{path} is not a TPM-sealed key ({SEALED_FORMAT})",
                hint="restore it from a backup, or enrol again to make new keys",
            ) from None


class Tpm:
    """One TPM 2.0, reached through tpm2-tools with the TCTI ``tcti`` ("": the kernel's)."""

    def __init__(self, tcti: str = "") -> None:
        self.tcti = tcti or DEFAULT_TCTI
        self._managed = self.tcti.startswith(_MANAGED_TCTIS)

    def check(self) -> None:
        """Make sure the TPM answers and its owner hierarchy derives our primary key."""
        with self._workdir() as work:
            self._primary(work)

    def seal(self, secret: bytes) -> SealedBlob:
        """Seal ``secret`` (at most 128 bytes) so only this TPM unseals it."""
        with self._workdir() as work:
            primary = self._primary(work)
            pub, priv = work / "sealed.pub", work / "sealed.priv"
            self._run(
                "tpm2_create",
                "-C",
                str(primary),
                "-a",
                _SEALED_ATTRIBUTES,
                "-i",
                "-",
                "-u",
                str(pub),
                "-r",
                str(priv),
                stdin=secret,
                doing="seal a key",
            )
            return SealedBlob(pub.read_bytes(), priv.read_bytes(), self.tcti)

    def unseal(self, blob: SealedBlob, what: Path) -> bytes:
        """The secret ``blob`` (read from ``what``) holds; KeyFileError if this TPM cannot."""
        with self._workdir() as work:
            primary = self._primary(work)
            pub, priv, obj = work / "sealed.pub", work / "sealed.priv", work / "sealed.ctx"
            pub.write_bytes(blob.public)
            priv.write_bytes(blob.private)
            self._run(
                "tpm2_load",
                "-C",
                str(primary),
                "-u",
                str(pub),
                "-r",
                str(priv),
                "-c",
                str(obj),
                doing=f"load {what}",
            )
            return self._run("tpm2_unseal", "-c", str(obj), doing=f"unseal {what}")

    @contextlib.contextmanager
    def _workdir(self) -> Iterator[Path]:
        work = Path(tempfile.mkdtemp(prefix="edgepack-tpm-"))  # mode 0700
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _primary(self, work: Path) -> Path:
        ctx = work / "primary.ctx"
        self._run(
            "tpm2_createprimary", *_PRIMARY_ARGS, "-c", str(ctx), doing="create its primary key"
        )
        return ctx

    def _run(self, tool: str, *args: str, stdin: bytes = b"", doing: str) -> bytes:
        """Run one tool; its standard output, or a one-line KeyFileError."""
        out = self._exec(tool, args, stdin, doing)
        if out.returncode != 0:
            raise self._failure(tool, out.stderr.decode("utf-8", "replace"), doing)
        if not self._managed:
            self._exec("tpm2_flushcontext", ("-t",), b"", "free its object slots")
        return out.stdout

    def _exec(
        self, tool: str, args: tuple[str, ...], stdin: bytes, doing: str
    ) -> subprocess.CompletedProcess[bytes]:
        env = dict(os.environ, TPM2TOOLS_TCTI=self.tcti)
        env.pop("TSS2_LOG", None)
        try:
            return subprocess.run(
                [tool, *args],
                input=stdin,
                capture_output=True,
                env=env,
                timeout=TPM_TIMEOUT_S,
                check=False,
            )
        except FileNotFoundError:
            raise KeyFileError(
                f"cannot {doing} with the TPM: {tool} is not installed",
                hint="install tpm2-tools (apt-get install tpm2-tools), or use --key-protection file",
            ) from None
        except subprocess.TimeoutExpired:
            raise KeyFileError(
                f"the TPM at {self.tcti} did not answer within {TPM_TIMEOUT_S:g} s",
                hint="check the TPM (tpm2_selftest) and --tpm-tcti",
            ) from None

    def _failure(self, tool: str, stderr: str, doing: str) -> KeyFileError:
        """What a failed tool said, as one line a person can act on."""
        text = stderr.lower()
        if "could not load tcti" in text or "failed to instantiate tcti" in text:
            reason = (
                "permission denied"
                if "permission denied" in text
                else "no such device"
                if "no such file" in text
                else "connection refused"
                if "refused" in text
                else "no TPM answers there"
            )
            hint = (
                "run the agent as a member of the tss group"
                if reason == "permission denied"
                else "check --tpm-tcti, or enrol with --key-protection file on a device "
                "without a TPM"
            )
            return KeyFileError(f"cannot reach the TPM at {self.tcti}: {reason}", hint=hint)
        if tool == "tpm2_load" and ("integrity" in text or "0x9a2" in text or "0x98b" in text):
            return KeyFileError(
                f"the TPM at {self.tcti} cannot {doing}: it was sealed by another TPM, or "
                "this TPM was cleared since",
                hint="the sealed keys are lost: enrol again (and reinstall the releases)",
            )
        if tool == "tpm2_createprimary" and ("auth" in text or "hierarchy" in text):
            return KeyFileError(
                f"the TPM at {self.tcti} refused to create its primary key under the owner "
                "hierarchy",
                hint="the owner hierarchy needs an empty password (tpm2_changeauth -c o)",
            )
        detail = next(
            (
                line.split("ERROR:", 1)[1].strip()
                for line in reversed(stderr.splitlines())
                if line.startswith("ERROR:") and "Unable to run" not in line
            ),
            stderr.strip().splitlines()[-1] if stderr.strip() else f"{tool} failed",
        )
        return KeyFileError(
            f"the TPM at {self.tcti} could not {doing}: {detail}",
            hint="check the TPM (tpm2_selftest) and --tpm-tcti",
        )


def _read_small(path: Path, *, private: bool) -> bytes:
    """A key file's bytes, refusing links, other users' read access and oversize files."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise KeyFileError(
            f"{path} is missing", hint="enrol again, or restore it from a backup"
        ) from None
    except OSError as exc:
        raise KeyFileError(
            f"cannot read the key {path}: {exc.strerror}",
            hint="run as the agent's user, or a member of its group",
        ) from None
    with os.fdopen(fd, "rb") as fh:
        mode = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
        if mode & (0o077 if private else 0o007):
            raise KeyFileError(
                f"{path} is readable by other users (mode {mode:04o})",
                hint=f"run: chmod {'600' if private else '440'} {path}",
            )
        data = fh.read(MAX_SEALED_FILE + 1)
    if len(data) > MAX_SEALED_FILE:
        raise KeyFileError(f"{path} is too large to be a key file")
    return data


def unseal_file(path: Path, tcti: str | None = None, *, private: bool = True) -> bytes:
    """The secret sealed in the blob file ``path``, by the TPM ``tcti`` (None: the one
    recorded in the blob)."""
    blob = SealedBlob.from_bytes(_read_small(path, private=private), path)
    return Tpm(blob.tcti if tcti is None else tcti).unseal(blob, path)


def seal_file(path: Path, secret: bytes, tcti: str, *, mode: int) -> None:
    """Seal ``secret`` with the TPM ``tcti`` and write the blob to ``path`` (atomically)."""
    blob = Tpm(tcti).seal(secret)
    _atomic.write_bytes(path, blob.to_bytes(), mode=mode)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        _atomic.fsync_dir(path.parent)


def ensure_storage_key(data_dir: Path, protection: str = "file", tcti: str = "") -> bytes:
    """The device's storage key, made now when the data directory has none yet, kept in
    the protection asked for.

    The key itself never changes (installed revisions are sealed with it): a key kept
    the other way is moved, the new form written before the old one is removed, so a
    crash leaves one usable form. ``tcti`` is the configuration's (``""``: the kernel's).
    """
    check_protection(protection, tcti)
    plain, sealed = storage_key_path(data_dir), sealed_storage_key_path(data_dir)
    if sealed.exists():
        key = unseal_file(sealed, tcti, private=False)
        if protection == "tpm":
            blob = SealedBlob.from_bytes(_read_small(sealed, private=False), sealed)
            if blob.tcti != Tpm(tcti).tcti:  # the same TPM, reached another way now
                seal_file(sealed, key, tcti, mode=0o440)
            _unlink(plain)  # left by a move that was cut short
            return key
        _atomic.write_bytes(plain, key, mode=0o440)
        _unlink(sealed)
        return key
    if plain.exists():
        key = load_storage_key(data_dir)
        if protection == "tpm":
            seal_file(sealed, key, tcti, mode=0o440)
            _unlink(plain)
        return key
    key = secrets.token_bytes(STORAGE_KEY_SIZE)
    if protection == "tpm":
        blob = Tpm(tcti).seal(key)  # before anything is written: no TPM, no key
        sealed.parent.mkdir(parents=True, exist_ok=True)
        _atomic.write_bytes(sealed, blob.to_bytes(), mode=0o440)
    else:
        plain.parent.mkdir(parents=True, exist_ok=True)
        _atomic.write_bytes(plain, key, mode=0o440)
    return key


def load_storage_key(data_dir: Path, *, tcti: str | None = None) -> bytes:
    """Read the storage key, from whichever form the data directory holds.

    A TPM-sealed key is unsealed by the TPM ``tcti`` (None: the one it was sealed
    by). A clear :class:`KeyFileError` when it is missing or cannot be had.
    """
    sealed = sealed_storage_key_path(data_dir)
    if sealed.exists():
        key = unseal_file(sealed, tcti, private=False)
        if len(key) != STORAGE_KEY_SIZE:
            raise KeyFileError(f"{sealed} does not seal a {STORAGE_KEY_SIZE}-byte storage key")
        return key
    path = storage_key_path(data_dir)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise KeyFileError(
            f"{path} is missing: the installed models cannot be decrypted",
            hint="`edgepack-agent run --once` makes a new key and installs the releases again",
        ) from None
    except OSError as exc:
        raise KeyFileError(
            f"cannot read the storage key {path}: {exc.strerror}",
            hint="run the application as a member of the agent's group",
        ) from None
    with os.fdopen(fd, "rb") as fh:
        key = fh.read(STORAGE_KEY_SIZE + 1)
    if len(key) != STORAGE_KEY_SIZE:
        raise KeyFileError(f"{path} is not a {STORAGE_KEY_SIZE}-byte storage key")
    return key


def _raw_private(private: x25519.X25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return private.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def _sealed_recipient(path: Path, tcti: str) -> x25519.X25519PrivateKey:
    from cryptography.hazmat.primitives.asymmetric import x25519

    raw = unseal_file(path, tcti)
    if len(raw) != 32:
        raise KeyFileError(f"{path} does not seal an X25519 recipient key")
    return x25519.X25519PrivateKey.from_private_bytes(raw)


def existing_recipient_key(
    key_path: Path, passphrase_env: str | None, tcti: str = ""
) -> x25519.X25519PrivateKey | None:
    """The recipient key already kept at ``key_path`` (its file or its sealed form), or None."""
    from edgepack.keys import load_recipient_private_key

    if sealed_path(key_path).exists():
        return _sealed_recipient(sealed_path(key_path), tcti)
    if key_path.exists():
        return load_recipient_private_key(key_path, passphrase_env)
    return None


def _sealed_holds(sealed: Path, raw: bytes, tcti: str) -> bool:
    """Whether ``sealed`` already seals ``raw`` with the TPM ``tcti``, reached the same way."""
    if not sealed.exists():
        return False
    blob = SealedBlob.from_bytes(_read_small(sealed, private=True), sealed)
    tpm = Tpm(tcti)
    return blob.tcti == tpm.tcti and secrets.compare_digest(tpm.unseal(blob, sealed), raw)


def store_recipient_key(
    key_path: Path,
    private: x25519.X25519PrivateKey,
    protection: str,
    tcti: str = "",
    *,
    file_bytes: bytes | None = None,
) -> Path:
    """Keep the recipient key ``private`` as ``protection`` asks; the path the
    configuration names.

    ``file``: ``key_path`` (0600), ``file_bytes`` as given when there are some (an
    encrypted key stays encrypted), else a PEM written only when there is no file yet.
    ``tpm``: only its 32 raw bytes, sealed, in ``key_path.tpm`` (0600); a passphrase
    it had is not needed any more. The other form is removed once the new one is on disk.
    """
    from edgepack.keys import private_pem, write_private_file

    check_protection(protection, tcti)
    sealed = sealed_path(key_path)
    if protection == "tpm":
        raw = _raw_private(private)
        if not _sealed_holds(sealed, raw, tcti):  # re-enrolment: the same blob, unchanged
            seal_file(sealed, raw, tcti, mode=0o600)
        _unlink(key_path)
        return sealed
    if file_bytes is not None:
        write_private_file(key_path, file_bytes)
    elif not key_path.exists():
        write_private_file(key_path, private_pem(private, None))
    _unlink(sealed)
    return key_path


def load_recipient_key(config: AgentConfig, passphrase_env: str | None) -> x25519.X25519PrivateKey:
    """The device's recipient private key, however it is protected."""
    from edgepack.keys import load_recipient_private_key

    path = Path(config.recipient_key)
    if path.name.endswith(SEALED_SUFFIX):
        return _sealed_recipient(path, config.tpm_tcti)
    return load_recipient_private_key(path, passphrase_env)
