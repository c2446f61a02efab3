"""Revision directories and the ``current`` symlink of one model.

Layout: ``DATA/models/NAME/REV/`` (read-only once installed) and
``DATA/models/NAME/current -> REV``. The switch creates a temporary symlink
and renames it over ``current`` (``os.replace`` is atomic on POSIX), so at
every instant ``current`` names one complete revision.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path

from device_agent import _atomic, names
from device_agent._crashpoint import crashpoint

CURRENT = "current"
# A model is its owner's property: revisions are read-only, and readable only by the
# agent's user and its group (the applications that load the model), never by others.
FILE_MODE = 0o440
DIR_MODE = 0o550
_TMP_LINK = ".current.tmp"
MANIFESTS = ".manifests"


def _make_tree_writable(root: Path) -> None:
    for dirpath, dirnames, _ in os.walk(root):
        Path(dirpath).chmod(0o750)  # owner-writable only to delete it
        for d in dirnames:
            p = Path(dirpath) / d
            if not p.is_symlink():
                p.chmod(0o750)


def make_read_only(root: Path) -> None:
    """Drop write permission on every file and folder of a revision, and flush its folders.

    The files were fsynced when written; fsyncing each folder makes their names
    durable too, before the revision can become ``current``.
    """
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                p.chmod(FILE_MODE)
        _atomic.fsync_dir(Path(dirpath))
        Path(dirpath).chmod(DIR_MODE)


class UnsafeDeletionError(ValueError):
    """A deletion named a path outside the folder it was meant to stay in."""


def _check_inside(path: Path, inside: Path) -> None:
    # The parent is resolved, the last component is not: a symlink is removed, never followed.
    real = Path(os.path.realpath(path.parent)) / path.name
    base = Path(os.path.realpath(inside))
    if path.name in ("", ".", "..") or real == base or not real.is_relative_to(base):
        raise UnsafeDeletionError(f"refusing to delete {path}: it is not inside {inside}")


def remove_tree(root: Path, *, inside: Path) -> None:
    """Remove a (possibly read-only) tree inside ``inside``; nothing when it is gone already.

    Every deletion names the folder it must stay in, and a path that does not
    resolve strictly inside it is refused, whatever name built it.
    """
    _check_inside(root, inside)
    if not root.exists() and not root.is_symlink():
        return
    if root.is_symlink() or root.is_file():
        root.unlink()
        return
    _make_tree_writable(root)
    shutil.rmtree(root)


def _folder_name(revision: str) -> str:
    # Names on disk may predate a rule, so only what would leave the folder is refused.
    if revision in ("", ".", "..") or "/" in revision or "\0" in revision:
        raise UnsafeDeletionError(f"{revision!r} is not a revision folder name")
    return revision


class Slots:
    """The installed revisions of one model."""

    def __init__(self, data_dir: Path, name: str) -> None:
        self.name = names.model(name)
        self.data_dir = data_dir
        self.root = data_dir / "models" / name
        self.staging_root = data_dir / "staging" / name

    def revision_dir(self, revision: str) -> Path:
        """Where a revision lives (``revision`` must be one folder name)."""
        return self.root / _folder_name(revision)

    def staging_dir(self, revision: str) -> Path:
        """Where a revision is unpacked and checked before it is installed."""
        return self.staging_root / _folder_name(revision)

    def remove_staging(self, revision: str | None = None) -> None:
        """Remove one staged revision, or the model's whole staging area."""
        path = self.staging_root if revision is None else self.staging_dir(revision)
        remove_tree(path, inside=self.data_dir / "staging")

    def current(self) -> str | None:
        """The active revision, or ``None`` on a device that never had one.

        The agent only ever links ``current`` to a sibling folder's bare name; a
        link anywhere else (``/elsewhere/model``, ``../../x``) or a plain file in
        its place is not an active revision, and :meth:`foreign_current` says so.
        """
        target = self._link_target()
        if target is None or not self._is_own_link(target):
            return None
        return target

    def _link_target(self) -> str | None:
        try:
            return str((self.root / CURRENT).readlink())
        except (FileNotFoundError, NotADirectoryError, OSError):
            return None

    def _is_own_link(self, target: str) -> bool:
        return (
            target not in ("", ".", "..")
            and "/" not in target
            and not target.startswith(".")
            and self.revision_dir(target).is_dir()
            and not self.revision_dir(target).is_symlink()
        )

    def foreign_current(self) -> bool:
        """True when ``current`` exists but is not a link to one of this model's revisions."""
        link = self.root / CURRENT
        if not link.exists() and not link.is_symlink():
            return False
        target = self._link_target()
        return target is None or not self._is_own_link(target)

    def drop_current(self) -> None:
        """Remove ``current`` (a link; or what a tamperer put in its place)."""
        link = self.root / CURRENT
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.is_dir():
            remove_tree(link, inside=self.root)
        _atomic.fsync_dir(self.root)

    def manifest_path(self, revision: str) -> Path:
        """Where the signed manifest of an installed revision is kept (beside it)."""
        return self.root / MANIFESTS / f"{_folder_name(revision)}.json"

    def verify(self, revision: str) -> str | None:
        """Check an installed revision's files against its manifest: ``None`` when intact,
        else what is wrong. A revision installed before manifests were kept passes."""
        import hashlib
        import json

        try:
            entries = json.loads(self.manifest_path(revision).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return "its manifest is unreadable"
        root = self.revision_dir(revision)
        expected = {str(e["path"]): (int(e["size"]), str(e["sha256"])) for e in entries}
        present: set[str] = set()
        for d, dirs, files in os.walk(root):
            if any((Path(d) / sub).is_symlink() for sub in dirs):
                return "it holds a symbolic link"
            present.update((Path(d) / f).relative_to(root).as_posix() for f in files)
        if present - set(expected):
            return f"it holds files the bundle did not: {sorted(present - set(expected))[:3]}"
        for rel, (size, digest) in sorted(expected.items()):
            path = root / rel
            try:
                info = path.lstat()
            except FileNotFoundError:
                return f"{rel} is missing"
            if not stat.S_ISREG(info.st_mode) or info.st_size != size:
                return f"{rel} is not the {size}-byte file the bundle installed"
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                while block := fh.read(1024 * 1024):
                    h.update(block)
            if h.hexdigest() != digest:
                return f"{rel} no longer matches its signed digest"
        return None

    def installed(self) -> list[str]:
        """Revision directories present on disk."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
        )

    def install(
        self, staged: Path, revision: str, manifest: list[dict[str, object]] | None = None
    ) -> Path:
        """Move a checked staging folder into place as a read-only revision, its signed
        ``manifest`` (path, size, sha256 per file) kept beside it for :meth:`verify`."""
        import json

        dest = self.revision_dir(revision)
        self.root.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            remove_tree(dest, inside=self.root)
        if manifest is not None:
            (self.root / MANIFESTS).mkdir(mode=0o750, exist_ok=True)
            _atomic.write_bytes(
                self.manifest_path(revision), json.dumps(manifest).encode(), mode=0o440
            )
        make_read_only(staged)
        # staging/ and models/ share the data directory, so this is a rename, not a copy.
        staged.chmod(0o700)  # renaming a folder needs write access to it
        staged.rename(dest)
        dest.chmod(DIR_MODE)
        _atomic.fsync_dir(self.root)
        return dest

    def switch(self, revision: str) -> None:
        """Point ``current`` at ``revision`` atomically."""
        if not self.revision_dir(revision).is_dir():
            raise FileNotFoundError(f"revision {revision} of {self.name} is not installed")
        tmp = self.root / _TMP_LINK
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(revision)
        crashpoint("symlink-created")
        tmp.replace(self.root / CURRENT)
        _atomic.fsync_dir(self.root)

    def remove(self, revision: str) -> None:
        """Delete a revision and its monitoring folder; refuses to delete the active one."""
        if revision == self.current():
            raise ValueError(f"refusing to remove the active revision {revision} of {self.name}")
        remove_tree(self.revision_dir(revision), inside=self.root)
        with contextlib.suppress(FileNotFoundError):
            self.manifest_path(revision).unlink()
        from device_agent import monitorstore  # it builds on this module

        monitorstore.remove_revision(self.data_dir, self.name, revision)

    def clean_temporaries(self) -> None:
        """Remove a left-over temporary symlink and the staging area."""
        tmp = self.root / _TMP_LINK
        if tmp.is_symlink():
            tmp.unlink()
        self.remove_staging()

    def is_regular_tree(self, revision: str) -> bool:
        """True when every entry of the revision is a plain file or folder."""
        for dirpath, dirnames, filenames in os.walk(self.revision_dir(revision)):
            for n in dirnames + filenames:
                mode = os.lstat(Path(dirpath) / n).st_mode
                if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                    return False
        return True
