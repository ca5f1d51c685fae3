"""Crash hygiene: what an earlier attempt of this flow run left behind.

When a flow-run process is killed (kill -9, a lost machine) nothing reports a final state for
the task runs it was running: they stay Running (or Pending, or AwaitingRetry) forever, the
graph draws an ever-growing bar for them, and their progress artifacts stay next to the live
ones. A retry (`prefect flow-run retry`, the UI's Retry) starts a new attempt of the *same*
flow run id, so at the start of every attempt `crash_leftovers()` marks the task runs of
earlier attempts that are not in a final state Crashed (and the child flow runs they started,
with their task runs), and rewrites the description of their progress artifacts to say that
the attempt crashed and was superseded. The graph and the artifacts then show only live work.

It is called first thing in the flow (flows/distill.py), before any task of the new attempt
exists; it only touches runs of earlier attempts (`flow_run_run_count` below the flow run's
current `run_count`), and a failure of the clean-up never fails the flow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from uuid import UUID

from prefect import get_run_logger
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import ArtifactUpdate
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterTaskRunId,
    ArtifactFilterType,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentTaskRunId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.runtime import flow_run as runtime
from prefect.states import Crashed

log = logging.getLogger("d3s.hygiene")


def _logger():
    """The flow run's logger (its lines show in the UI) inside a run, else a plain one."""
    try:
        return get_run_logger()
    except Exception:
        return log


# Every state a run can be left in by a process that died: not COMPLETED, FAILED, CANCELLED or
# CRASHED. (AwaitingRetry is a SCHEDULED state; a killed CANCELLING run never gets Cancelled.)
NOT_FINAL = [
    StateType.SCHEDULED,
    StateType.PENDING,
    StateType.RUNNING,
    StateType.PAUSED,
    StateType.CANCELLING,
]
SUPERSEDED = "superseded"  # in every message and artifact description written here
_PAGE = 200


@dataclass
class Cleanup:
    """What `crash_leftovers` did (for the log line and the tests)."""

    flow_run_id: UUID | None = None
    attempt: int = 0
    task_runs: list[UUID] = field(default_factory=list)
    flow_runs: list[UUID] = field(default_factory=list)  # child flow runs
    artifacts: list[UUID] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.task_runs or self.flow_runs or self.artifacts)


def _paged(read, **kwargs) -> list:
    out, offset = [], 0
    while True:
        page = read(**kwargs, limit=_PAGE, offset=offset)
        out += page
        if len(page) < _PAGE:
            return out
        offset += _PAGE


def _not_final_task_runs(client: SyncPrefectClient, flow_run_id: UUID) -> list:
    return _paged(
        client.read_task_runs,
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
        task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id]),
            state=TaskRunFilterState(type=TaskRunFilterStateType(any_=NOT_FINAL)),
        ),
    )


def _crash_task_runs(client: SyncPrefectClient, runs: list, message: str, done: Cleanup) -> None:
    for tr in runs:
        client.set_task_run_state(tr.id, Crashed(message=message), force=True)
        done.task_runs.append(tr.id)
    if not runs:
        return
    ids = [tr.id for tr in runs]
    # Child flow runs (subflows such as the Dask stages) started by those task runs.
    children = _paged(
        client.read_flow_runs,
        flow_run_filter=FlowRunFilter(
            parent_task_run_id=FlowRunFilterParentTaskRunId(any_=ids),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=NOT_FINAL)),
        ),
    )
    for child in children:
        client.set_flow_run_state(child.id, Crashed(message=message), force=True)
        done.flow_runs.append(child.id)
        _crash_task_runs(client, _not_final_task_runs(client, child.id), message, done)
    # Their progress artifacts: keep the last fraction, say that it is dead.
    arts = _paged(
        client.read_artifacts,
        artifact_filter=ArtifactFilter(
            task_run_id=ArtifactFilterTaskRunId(any_=ids),
            type=ArtifactFilterType(any_=["progress"]),
        ),
    )
    for art in arts:
        desc = (art.description or "").strip()
        if SUPERSEDED in desc:
            continue
        note = f"{message}" if not desc else f"{desc} — {message}"
        client.update_artifact(art.id, ArtifactUpdate(description=note))
        done.artifacts.append(art.id)


def crash_leftovers(
    flow_run_id: UUID | str | None = None, client: SyncPrefectClient | None = None
) -> Cleanup:
    """Mark Crashed the task runs of earlier attempts of this flow run that are not final (and
    the child flow runs they started), and mark their progress artifacts superseded.

    `flow_run_id` defaults to the flow run this is called in; outside a flow run, or when the
    API cannot be reached, it does nothing (and logs why)."""
    done = Cleanup()
    fid = flow_run_id or runtime.id
    if not fid:
        return done
    done.flow_run_id = uid = UUID(str(fid))
    try:
        if client is None:
            with get_client(sync_client=True) as c:
                return _crash_leftovers(c, uid, done)
        return _crash_leftovers(client, uid, done)
    except Exception:  # hygiene must never fail the run it tidies up for
        _logger().warning("crash hygiene for flow run %s failed", fid, exc_info=True)
        return done


def _crash_leftovers(client: SyncPrefectClient, flow_run_id: UUID, done: Cleanup) -> Cleanup:
    fr = client.read_flow_run(flow_run_id)
    done.attempt = fr.run_count or 1
    stale = [
        tr
        for tr in _not_final_task_runs(client, flow_run_id)
        if (tr.flow_run_run_count or 0) < done.attempt
    ]
    by_attempt: dict[int, list] = {}
    for tr in stale:
        by_attempt.setdefault(tr.flow_run_run_count or 0, []).append(tr)
    for attempt, runs in sorted(by_attempt.items()):
        message = (
            f"attempt {attempt} of flow run {fr.name or flow_run_id} crashed "
            f"(its process died); {SUPERSEDED} by attempt {done.attempt}"
        )
        _crash_task_runs(client, runs, message, done)
    if done:
        _logger().warning(
            "attempt %d: marked %d task run(s) and %d child flow run(s) of earlier attempts "
            "Crashed, %d progress artifact(s) %s",
            done.attempt,
            len(done.task_runs),
            len(done.flow_runs),
            len(done.artifacts),
            SUPERSEDED,
        )
    return done
