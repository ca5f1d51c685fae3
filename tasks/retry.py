"""Which failures a stage task retries: transient I/O only (a dropped connection, a timeout,
an object store asking to slow down). A bug, bad data or a damaged artifact fails at once: a
retry would fail the same way. A retried stage resumes from its checkpoint, so it costs at most
one checkpoint interval."""

from __future__ import annotations

import errno
from typing import Any

from storage.manifest import CorruptArtifact

TRANSIENT_ERRNOS = {
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ENETDOWN,
    errno.EPIPE,
    errno.EAGAIN,
}
# Exception classes of botocore / aiohttp / s3fs / urllib3 known to be transient, by name (the
# libraries are optional; matching names avoids importing them).
TRANSIENT_NAMES = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ClientConnectorError",
    "ClientOSError",
    "ServerDisconnectedError",
    "ServerTimeoutError",
    "ProtocolError",
    "SlowDown",
    "ServiceUnavailable",
    "RequestTimeout",
}
NEVER = (CorruptArtifact, FileNotFoundError, PermissionError, IsADirectoryError, ValueError)


def is_transient_io(exc: BaseException | None) -> bool:
    """True for an exception (or one in its cause/context chain) that a retry may not meet."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, NEVER):
            return False
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
            return True
        if any(c.__name__ in TRANSIENT_NAMES for c in type(exc).__mro__):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def retry_on_transient_io(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only a transient I/O failure."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as e:  # noqa: BLE001 - any failure is inspected, none swallowed
            exc = e
    return is_transient_io(exc)
