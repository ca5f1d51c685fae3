"""One writer per run.

Local roots: an exclusive, non-blocking `flock` on `<root>/.lock`, held for the life of the
writer. The kernel drops it when the process dies, even by SIGKILL, so a crashed run can be
resumed at once and never leaves a stale lock.

Object stores have no locks: a lease object `.lock.json` ({host, pid, id, time}) is written and
renewed every `ttl / 4` seconds by a heartbeat thread; another writer is refused while the lease
is younger than `ttl` seconds. On S3 every change to the lease is a conditional write, so of
several writers racing for it exactly one wins:

- acquire: create the lease with `If-None-Match: *`. If it exists and has expired (or is
  unreadable), take it over with `If-Match: <the ETag just read>`: of several takers one
  succeeds, the others get 412 and find a fresh lease.
- heartbeat: rewrite the lease with `If-Match: <the ETag of our last write>`. A 412 (or the lease
  gone) means another writer took it: the heartbeat stops, logs an error, and `check()` and
  `release()` raise `LockLost` naming the root. So does failing to renew it for `ttl` seconds,
  after which other writers treat it as expired.
- release: `DeleteObject` with `If-Match`, so a lease another writer has taken is never deleted.

Whether the store honours these conditions is probed once per bucket and process on a scratch
object `.lock.probe-<id>`: a conditional create of an existing object, a rewrite and a delete
with a wrong ETag must all be refused with 412. A store that rejects the conditions
(NotImplemented, InvalidArgument, ...) or ignores them (older S3-compatible servers; a botocore
too old to know the parameters, which s3fs then drops) gets the read-then-write lease, with a
WARNING: two writers started within the same instant can then both hold it. A store with
conditional writes but no conditional delete has its lease released by read, compare owner,
delete (a small window in which a lease taken over just then is deleted). Other object stores
(gcs, azure, memory, ...) always get the read-then-write lease, best effort, with the warning.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

from fsspec.asyn import sync

from .fs import RunFS

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
LEASE_FILE = ".lock.json"
PROBE_PREFIX = ".lock.probe-"
TAKE_ATTEMPTS = 5  # conditional takeovers lost to other writers before giving up
_WRONG_ETAG = '"00000000000000000000000000000000"'


class RunLocked(RuntimeError):
    """Another process is writing this run."""


class LockLost(RunLocked):
    """This process held the run's lease and another writer has taken it (or it could not be
    renewed in time): whatever this process writes now may interleave with the other writer."""


class RunLock:
    def __init__(self, fs: RunFS, ttl: float = 120.0):
        self.fs = fs
        self.ttl = ttl
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex}
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._obj: _LeaseObject | None = None
        self._support = _Support(put=False, delete=False)
        self._etag: str | None = None  # of our last write of the lease (conditional mode)
        self._renewed = 0.0  # time.monotonic() of our last successful write of the lease
        self._lost: str | None = None

    def acquire(self) -> RunLock:
        if self.fs.local:
            self._acquire_flock()
        else:
            self._acquire_lease()
        return self

    @property
    def conditional(self) -> bool:
        """Whether the lease is changed by conditional writes (S3 that honours them)."""
        return self._support.put

    @property
    def lost(self) -> bool:
        return self._lost is not None

    def check(self) -> None:
        """Raise LockLost if this process no longer holds the run's lease."""
        if self._lost is not None:
            raise LockLost(self._lost)

    # -- local roots ----------------------------------------------------------------------
    def _acquire_flock(self) -> None:
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

    # -- object stores --------------------------------------------------------------------
    def _acquire_lease(self) -> None:
        path = self.fs.path(LEASE_FILE)
        if _is_s3(self.fs.fs):
            self._obj = _S3Object(self.fs.fs, path)
            self._support = _s3_support(self.fs)
        else:
            self._obj = _FsspecObject(self.fs.fs, path)
            self._support = _Support(put=False, delete=False)
        if not self._support.put:
            log.warning(
                "%s: the store does not honour conditional writes; the lease is read then "
                "written, so two writers started at the same instant can both hold it",
                self.fs.url(),
            )
            self._take_unconditionally()
        else:
            self._take_conditionally()
        self._renewed = time.monotonic()
        self._lost = None
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()

    def _body(self) -> bytes:
        return json.dumps({**self.owner, "time": time.time()}).encode()

    def _ours(self, lease: dict[str, Any] | None) -> bool:
        return lease is not None and lease.get("id") == self.owner["id"]

    def _refuse_if_fresh(self, lease: dict[str, Any] | None) -> None:
        if lease is None or self._ours(lease):
            return
        age = time.time() - lease["time"]
        if age < self.ttl:
            raise RunLocked(
                f"run {self.fs.url()} is being written by {lease.get('host')} "
                f"pid {lease.get('pid')} "
                f"(lease renewed {age:.0f} s ago; it expires after "
                f"{self.ttl:.0f} s without renewal)"
            )

    def _take_conditionally(self) -> None:
        assert self._obj is not None
        for _ in range(TAKE_ATTEMPTS):
            try:
                self._etag = self._obj.put(self._body(), IfNoneMatch="*")
                return
            except _Refused:
                pass  # it exists (or another creation is in flight)
            current = self._obj.get()
            if current is None:
                continue  # released in between: try to create it again
            data, etag = current
            lease = _parse(data)
            if self._ours(lease):  # our creation, answered 412 when s3fs retried it
                self._etag = etag
                return
            self._refuse_if_fresh(lease)
            assert etag is not None  # S3 answers every GET with an ETag
            try:
                self._etag = self._obj.put(self._body(), IfMatch=etag)
            except _Refused:
                continue  # another writer changed it first: look again
            log.warning(
                "%s: took over the expired lease of %s",
                self.fs.url(),
                _holder(lease),
            )
            return
        raise RunLocked(
            f"run {self.fs.url()}: other writers kept changing the lease; "
            f"gave up after {TAKE_ATTEMPTS} attempts"
        )

    def _take_unconditionally(self) -> None:
        assert self._obj is not None
        current = self._obj.get()
        self._refuse_if_fresh(_parse(current[0]) if current else None)
        self._etag = self._obj.put(self._body())

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            if not self._renew():
                return

    def _renew(self) -> bool:
        """Rewrite the lease once; False once it is lost (then `_lost` says why)."""
        assert self._obj is not None
        try:
            if self._support.put:
                assert self._etag is not None
                try:
                    self._etag = self._obj.put(self._body(), IfMatch=self._etag)
                except _Refused:
                    current = self._obj.get()
                    lease = _parse(current[0]) if current else None
                    if not self._ours(lease):
                        return self._lose(f"the lease is now held by {_holder(lease)}")
                    assert current is not None
                    self._etag = current[1]  # our write, answered 412 when s3fs retried it
                    return True
            else:
                current = self._obj.get()
                lease = _parse(current[0]) if current else None
                if not self._ours(lease):
                    return self._lose(f"the lease is now held by {_holder(lease)}")
                self._etag = self._obj.put(self._body())
        except Exception as e:  # network, throttling: try again at the next beat
            silent = time.monotonic() - self._renewed
            if silent >= self.ttl:
                return self._lose(
                    f"it could not be renewed for {silent:.0f} s ({e}), so other writers "
                    "treat it as expired"
                )
            log.warning("%s: renewing the lease failed (%s); retrying", self.fs.url(), e)
            return True
        self._renewed = time.monotonic()
        return True

    def _lose(self, why: str) -> bool:
        self._lost = (
            f"run {self.fs.url()}: this process lost its writer lease: {why}. Another writer "
            "may be writing the run; stop this one and check the run (d3s verify)"
        )
        log.error("%s", self._lost)
        return False

    def _release_lease(self) -> None:
        assert self._obj is not None
        self.check()  # lost: never delete the lease another writer holds
        if self._support.delete:
            try:
                self._obj.delete(IfMatch=self._etag)
                return
            except _Refused:
                pass  # changed since our last write: see whose it is
        current = self._obj.get()
        lease = _parse(current[0]) if current else None
        if not self._ours(lease):
            self._lose(f"the lease is now held by {_holder(lease)}")
            self.check()
        assert current is not None
        if self._support.delete:
            try:
                self._obj.delete(IfMatch=current[1])
            except _Refused:
                self._lose("the lease changed while it was being released")
                self.check()
        else:
            # No conditional delete on this store: read, compare the owner, then delete. A
            # lease taken over between the read and the delete would be deleted.
            self._obj.delete()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._release_lease()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _parse(data: bytes) -> dict[str, Any] | None:
    """The lease, or None if it is not one (then it is treated as expired)."""
    try:
        lease = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(lease, dict) or not isinstance(lease.get("time"), int | float):
        return None
    return lease


def _holder(lease: dict[str, Any] | None) -> str:
    if lease is None:
        return "nobody (the lease is gone or unreadable)"
    return f"{lease.get('host')} pid {lease.get('pid')}"


# -- the lease object ---------------------------------------------------------------------


class _Refused(Exception):
    """The store refused a conditional request: 412 (the condition does not hold), 409 (a
    conflicting conditional write in flight) or 404 (If-Match on an object that is gone)."""

    def __init__(self, code: str, status: int):
        super().__init__(f"{code} ({status})")
        self.code = code
        self.status = status


@dataclass(frozen=True)
class _Support:
    put: bool  # If-None-Match / If-Match on PutObject
    delete: bool  # If-Match on DeleteObject


class _LeaseObject:
    def get(self) -> tuple[bytes, str | None] | None:
        """(bytes, ETag) of the object, or None if there is none."""
        raise NotImplementedError

    def put(self, data: bytes, **condition: str) -> str | None:
        """Write the object (if `condition` holds); return its new ETag."""
        raise NotImplementedError

    def delete(self, **condition: str | None) -> None:
        raise NotImplementedError


class _FsspecObject(_LeaseObject):
    """Any fsspec store: plain reads and writes (no conditions)."""

    def __init__(self, fs: Any, path: str):
        self.fs, self.path = fs, path

    def get(self) -> tuple[bytes, str | None] | None:
        try:
            return bytes(self.fs.cat_file(self.path)), None
        except FileNotFoundError:
            return None

    def put(self, data: bytes, **condition: str) -> str | None:
        assert not condition
        self.fs.pipe_file(self.path, data)
        return None

    def delete(self, **condition: str | None) -> None:
        assert not condition
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass


class _S3Object(_LeaseObject):
    """One S3 object through the s3fs filesystem's own client (its endpoint, credentials and
    extra request arguments), with ETags and conditional requests."""

    def __init__(self, s3: Any, path: str):
        self.s3, self.path = s3, path
        self.bucket, self.key, _ = s3.split_path(path)

    def _call(self, method: str, **kwargs: Any) -> Any:
        try:
            return self.s3.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)
        except Exception as e:
            code, status = _error_code(e)
            conditional = "IfMatch" in kwargs or "IfNoneMatch" in kwargs
            if conditional and (
                status in (409, 412)
                or code in ("PreconditionFailed", "ConditionalRequestConflict")
                or ("IfMatch" in kwargs and (status == 404 or code == "NoSuchKey"))
            ):
                raise _Refused(code, status) from e
            raise
        finally:
            self.s3.invalidate_cache(self.path)  # s3fs's listings cache

    def get(self) -> tuple[bytes, str | None] | None:
        async def read() -> tuple[bytes, str]:
            out = await self.s3._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            body = out["Body"]
            try:
                data = await body.read()
            finally:
                body.close()
            return bytes(data), str(out["ETag"])

        try:
            result: tuple[bytes, str] = sync(self.s3.loop, read)
        except FileNotFoundError:
            return None
        return result

    def put(self, data: bytes, **condition: str) -> str | None:
        return str(self._call("put_object", Body=data, **condition)["ETag"])

    def delete(self, **condition: str | None) -> None:
        self._call("delete_object", **{k: v for k, v in condition.items() if v is not None})


def _error_code(e: BaseException | None) -> tuple[str, int]:
    """The S3 error code and HTTP status behind an exception (s3fs translates botocore's
    ClientError into OSError subclasses, keeping it as the cause); ("", 0) if there is none."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return str(response["Error"].get("Code", "")), int(status)
        e = e.__cause__ or e.__context__
    return "", 0


def _is_s3(fs: Any) -> bool:
    try:
        import s3fs  # an optional backend (~0.5 s to import): local roots never need it
    except ImportError:
        return False
    return isinstance(fs, s3fs.S3FileSystem)


# What each S3 filesystem (its endpoint and credentials) honours, by bucket.
_SUPPORT: weakref.WeakKeyDictionary[Any, dict[str, _Support]] = weakref.WeakKeyDictionary()
_SUPPORT_GUARD = threading.Lock()


def _s3_support(fs: RunFS) -> _Support:
    bucket = fs.fs.split_path(fs.root)[0]
    with _SUPPORT_GUARD:
        known = _SUPPORT.get(fs.fs, {}).get(bucket)
    if known is not None:
        return known
    probe = _S3Object(fs.fs, posixpath.join(fs.root, PROBE_PREFIX + uuid.uuid4().hex))
    support = _probe(probe)
    if support.put and not support.delete:
        log.warning(
            "%s: the store honours conditional writes but not conditional deletes; a released "
            "lease is read, compared and then deleted",
            fs.url(),
        )
    with _SUPPORT_GUARD:
        _SUPPORT.setdefault(fs.fs, {})[bucket] = support
    return support


def _probe(obj: _S3Object) -> _Support:
    """Which conditional requests the store enforces, tried on a scratch object: each one below
    must be refused with 412. A store that answers otherwise (NotImplemented, InvalidArgument,
    ...) or carries the request out (the condition ignored) does not enforce it."""
    obj.put(b"probe")
    try:
        put = _refused(lambda: obj.put(b"probe", IfNoneMatch="*")) and _refused(
            lambda: obj.put(b"probe", IfMatch=_WRONG_ETAG)
        )
        delete = _refused(lambda: obj.delete(IfMatch=_WRONG_ETAG))
    finally:
        obj.delete()
    return _Support(put=put, delete=delete)


def _refused(request: Any) -> bool:
    try:
        request()
    except _Refused as e:
        return e.status == 412 or e.code == "PreconditionFailed"
    except OSError as e:
        code, status = _error_code(e)
        if not code and not status:
            raise  # not an answer from the store (network): no conclusion
        log.info("conditional request not supported: %s (%s, %s)", e, code, status)
        return False
    return False
