"""Operating-system errors (no space, read-only file system, no permission) as one line.

A write that fails leaves nothing half-written behind (storage/fs.py: the temporary file is
removed, the previous version stays; a stage's artifact counts as finished only once the
manifest records it), so the remedy is always "fix the cause, run the same command again": it
resumes. The `d3s` command prints that line to stderr and exits with status 2 instead of
showing a traceback:

    d3s: error: No space left on device: /runs/x/labels/epoch=3/part-0.parquet (nothing
    half-written counts as finished; free space, then run the same command again to resume)
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_STATUS = 2
_AGAIN = "then run the same command again to resume"
_PERMISSION = (
    "this user may not write there: fix the owner or mode (a root shared by a team wants "
    f"group write and umask 002) or use another --root, {_AGAIN}"
)
REMEDIES = {
    errno.ENOSPC: f"free space, {_AGAIN}",
    errno.EDQUOT: f"free space or raise the quota, {_AGAIN}",
    errno.EROFS: f"the file system is read-only: remount it read-write or use another --root, "
    f"{_AGAIN}",
    errno.EACCES: _PERMISSION,
    errno.EPERM: _PERMISSION,
    errno.EIO: f"the disk or network file system reported an I/O error: check it, {_AGAIN}",
}


def os_error_line(e: OSError, prog: str = "d3s") -> str:
    """`PROG: error: <what>: <path> (<what is safe>; <remedy>)`, one line."""
    if e.errno is None or not e.strerror:  # raised with a message only, e.g. "x: no such file"
        return f"{prog}: error: {e}"
    what = e.strerror
    if e.filename is not None:
        what += f": {os.fsdecode(e.filename)}"
    if e.filename2 is not None:
        what += f" -> {os.fsdecode(e.filename2)}"
    remedy = REMEDIES.get(e.errno)
    if remedy is None:
        return f"{prog}: error: {what}"
    return f"{prog}: error: {what} (nothing half-written counts as finished; {remedy})"


def report_os_error(e: OSError, prog: str = "d3s") -> int:
    """Print `os_error_line(e)` to stderr; returns the exit status (2) for a `main` to return."""
    print(os_error_line(e, prog), file=sys.stderr, flush=True)
    return EXIT_STATUS


@contextmanager
def guard_os_errors(prog: str = "d3s") -> Iterator[None]:
    """Turn an OSError escaping the block into one line on stderr and SystemExit(2)."""
    try:
        yield
    except OSError as e:
        raise SystemExit(report_os_error(e, prog)) from None
