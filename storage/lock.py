"""One writer per run.

Local roots: an exclusive, non-blocking `flock` on `<root>/.lock`, held for the life of the
writer. The kernel drops it when the process dies, even by SIGKILL, so a crashed run can be
resumed at once and never leaves a stale lock. Object stores have no locks: a lease object
`.lock.json` is written and refreshed by a heartbeat thread; another writer is refused while the
lease is fresher than `ttl` seconds.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from .fs import RunFS

LOCK_FILE = ".lock"
LEASE_FILE = ".lock.json"


class RunLocked(RuntimeError):
    """Another process is writing this run."""


class RunLock:
    def __init__(self, fs: RunFS, ttl: float = 120.0):
        self.fs = fs
        self.ttl = ttl
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex}
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> RunLock:
        if self.fs.local:
            self._acquire_flock()
        else:
            self._acquire_lease()
        return self

    def _acquire_flock(self) -> None:
        import fcntl

        self.fs.makedirs("")
        path = self.fs.path(LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLocked(
                f"run {self.fs.url()} is being written by another process ({holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.owner).encode(), 0)
        self._fd = fd

    def _lease(self) -> dict[str, Any] | None:
        if not self.fs.exists(LEASE_FILE):
            return None
        try:
            return dict(json.loads(self.fs.read_bytes(LEASE_FILE)))
        except (json.JSONDecodeError, FileNotFoundError):
            return None

    def _acquire_lease(self) -> None:
        lease = self._lease()
        if lease and lease.get("id") != self.owner["id"] and time.time() - lease["time"] < self.ttl:
            raise RunLocked(
                f"run {self.fs.url()} is being written by {lease.get('host')} "
                f"pid {lease.get('pid')} "
                f"(lease renewed {time.time() - lease['time']:.0f} s ago; it expires after "
                f"{self.ttl:.0f} s without renewal)"
            )
        self._write_lease()
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()

    def _write_lease(self) -> None:
        self.fs.write_bytes(LEASE_FILE, json.dumps({**self.owner, "time": time.time()}).encode())

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            self._write_lease()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.fs.remove(LEASE_FILE)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
