"""A run's root directory: a local path or any fsspec URL (s3://, gs://, ...), with atomic
writes and checksums.

Atomicity: on a local disk a file is written to a temporary name in the same directory,
fsynced, then renamed over the target (os.replace is atomic on POSIX). On object stores a PUT
of a whole object is atomic, so the object is uploaded in one piece. A reader never sees half a
file either way.

Failures: an OSError from a write (no space, a read-only file system, no permission) names the
file it was writing (the target, never the temporary name; ENOSPC from a write() names none),
and the temporary file is removed, so the previous version of the target is intact and nothing
half-written is left. Files get mode `0o666 & ~umask` (as `open()` would create them), not the
0600 of `tempfile.mkstemp`, so a team sharing a root (umask 002) can read each other's runs.

Credentials never pass through here as parameters that could be logged or saved: fsspec takes
them from the environment (AWS_ACCESS_KEY_ID, ...) or the user's config files.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .urls import check_no_credentials


class RunFS:
    """File operations relative to a run root. `root`: a path or URL."""

    def __init__(self, root: str | os.PathLike[str], **storage_options: Any):
        root = os.fspath(root)
        check_no_credentials(root, "run root")
        self.fs, path = fsspec.core.url_to_fs(root, **storage_options)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = os.path.abspath(path) if self.local else path.rstrip("/")
        self.protocol = "file" if self.local else _protocol(self.fs)
        self.storage_options = storage_options

    # -- names --------------------------------------------------------------------------
    def path(self, rel: str) -> str:
        """Filesystem path (no protocol) of `rel` under the root."""
        return posixpath.join(self.root, rel) if rel else self.root

    def url(self, rel: str = "") -> str:
        """Full URL of `rel`, for readers that take URLs (zarr, pyarrow, DuckDB)."""
        p = self.path(rel)
        return p if self.local else f"{self.protocol}://{p}"

    def __repr__(self) -> str:
        return f"RunFS({self.url()!r})"

    # -- reading --------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self.path(rel)))

    def read_bytes(self, rel: str) -> bytes:
        try:
            return bytes(self.fs.cat_file(self.path(rel)))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url(rel)}: no such file") from None

    def listdir(self, rel: str) -> list[str]:
        """Names directly under `rel` (empty if it does not exist)."""
        p = self.path(rel)
        if not self.fs.exists(p):
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in self.fs.ls(p, detail=False))

    def walk_files(self, rel: str) -> list[str]:
        """All files under `rel`, as paths relative to the root, sorted."""
        base = self.path(rel)
        if not self.fs.exists(base):
            return []
        if self.fs.isfile(base):
            return [rel]
        out = []
        for f in self.fs.find(base):
            f = f if self.local else f.removeprefix(f"{self.protocol}://")
            out.append(posixpath.relpath(f, self.root))
        return sorted(out)

    def tree_bytes(self, rel: str) -> int:
        """Total size in bytes of the files under `rel` (0 if it does not exist)."""
        return sum(int(self.fs.size(self.path(f))) for f in self.walk_files(rel))

    # -- writing --------------------------------------------------------------------------
    def makedirs(self, rel: str) -> None:
        if self.local:
            os.makedirs(self.path(rel), exist_ok=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write `data` atomically: all of it or nothing is visible at `rel`. An OSError names
        `rel`'s path; the previous version, if any, is then left as it was."""
        target = self.path(rel)
        if not self.local:
            self.fs.pipe_file(target, data)
            return
        directory = os.path.dirname(target)
        tmp = None
        try:
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
            try:
                os.fchmod(fd, file_mode())
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except BaseException as e:
            if tmp is not None:
                _remove_quietly(tmp)
            named = _naming(e, target) if isinstance(e, OSError) else None
            if named is not None:
                raise named from e
            raise
        _fsync_dir(directory)

    @contextmanager
    def atomic_local_path(self, rel: str) -> Iterator[str]:
        """A temporary local file path to write `rel` with any library; on success it is moved
        into place atomically (renamed locally, uploaded as one object remotely). An OSError
        that names no file (or the temporary one) is re-raised naming `rel`'s path."""
        target = self.path(rel)
        directory = os.path.dirname(target) if self.local else None
        tmp = None
        try:
            if directory:
                os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
            os.close(fd)
            yield tmp
            if self.local:
                os.chmod(tmp, file_mode())  # the library may have recreated it: after writing
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, target)
                _fsync_dir(directory or ".")
            else:
                self.fs.put_file(tmp, target)
        except OSError as e:
            # remotely the temporary file is on the local disk: an error naming it stays so
            named = _naming(e, self.url(rel)) if self.local or e.filename is None else None
            if named is not None:
                raise named from e
            raise
        finally:
            if tmp is not None:
                _remove_quietly(tmp)

    def sweep_temporaries(self) -> list[str]:
        """Delete `.tmp-*` files that a killed writer left behind (local roots; object stores
        never see them). Only call while holding the run's lock."""
        if not self.local or not os.path.isdir(self.root):
            return []
        removed = []
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                if name.startswith(".tmp-"):
                    os.unlink(os.path.join(dirpath, name))
                    removed.append(os.path.join(dirpath, name))
        return removed

    def remove(self, rel: str, recursive: bool = False) -> None:
        p = self.path(rel)
        if self.fs.exists(p):
            self.fs.rm(p, recursive=recursive)

    # -- checksums ------------------------------------------------------------------------
    def sha256(self, rel: str) -> str:
        """SHA-256 of one file, or of a directory tree (each file's relative name and hash,
        sorted), so a Zarr store has one checksum."""
        files = self.walk_files(rel)
        if files == [rel]:
            return hashlib.sha256(self.read_bytes(rel)).hexdigest()
        h = hashlib.sha256()
        for f in files:
            h.update(posixpath.relpath(f, rel).encode() + b"\0")
            h.update(hashlib.sha256(self.read_bytes(f)).digest())
        return h.hexdigest()


def _protocol(fs: fsspec.AbstractFileSystem) -> str:
    p = fs.protocol
    return p if isinstance(p, str) else p[0]


def _write_all(fd: int, data: bytes) -> None:
    """os.write until all of `data` is written (a write may be partial)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


_UMASK_GUARD = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status
    since 4.7); elsewhere set and restored under a lock (os.umask has no read-only form)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_GUARD:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode `open()` gives a new file: 0o666 less the umask (0o644 under umask 022, 0o664
    under 002)."""
    return 0o666 & ~current_umask()


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError, OSError):
        os.unlink(path)


def _naming(e: OSError, target: str) -> OSError | None:
    """A copy of `e` naming `target` where `e` names no file or a temporary one (a write() or
    fsync() failing with ENOSPC names none; mkstemp and the rename name the temporary file):
    a message must say which file could not be written. None where `e` is fine as it is."""
    name = e.filename
    if e.errno is None or (name is not None and not _is_temporary(name)):
        return None
    # OSError(errno, ...) builds the matching subclass (PermissionError for EACCES, ...).
    return OSError(e.errno, e.strerror or os.strerror(e.errno), target)


def _is_temporary(name: object) -> bool:
    return isinstance(name, (str, bytes, os.PathLike)) and os.path.basename(
        os.fsdecode(name)
    ).startswith(".tmp-")


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
