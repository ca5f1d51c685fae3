"""Crash hygiene (flows/hygiene.py) against a real `prefect server start`.

A tiny flow (defined here, shaped like the D3S flow: `crash_leftovers()` first, then tasks, one
with a progress artifact) runs in a subprocess until it blocks inside its second task; the
process is SIGKILLed (a kill -9 of the flow-run process), so that task run stays Running and
its progress artifact stuck at 40 %. The flow run is marked Crashed (what the zombie automation
does) and `prefect flow-run retry ID --entrypoint ...` runs a second attempt of the same flow
run id. The first attempt's task run must end Crashed, its progress artifact marked
superseded, and the second attempt's task runs Completed.

This module is also the retry's entrypoint, so it imports nothing from `tests` at import time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect import flow, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.runtime import flow_run as runtime_flow_run

from flows.hygiene import SUPERSEDED, crash_leftovers

HERE = Path(__file__).resolve()
# With D3S_TEST_NO_HYGIENE=1 the tiny flow skips crash_leftovers(), and the slow test must fail:
# the first attempt's task run stays Running (how it was checked that the clean-up does it).
NO_HYGIENE = "D3S_TEST_NO_HYGIENE"


@task(name="hygiene-quick")
def quick() -> int:
    return 1


@task(name="hygiene-blocker")
def blocker(block_file: str, marker: str) -> str:
    art = create_progress_artifact(40.0, description="blocker: 2/5 batches")
    Path(marker).write_text(str(runtime_flow_run.id))  # the test may kill us now
    while Path(block_file).exists():
        time.sleep(0.2)
    update_progress_artifact(art, 100.0, description="blocker: 5/5 batches")
    return "done"


@flow(name="hygiene-tiny")
def tiny_flow(block_file: str = "", marker: str = "") -> str:
    if os.environ.get(NO_HYGIENE) != "1":
        crash_leftovers()
    q = quick()
    return blocker(block_file, marker, wait_for=[q])


def _wait(pred, timeout: float, what: str, proc: subprocess.Popen | None = None, log=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (v := pred()) is not None and v is not False:
            return v
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.3)
    tail = Path(log).read_text()[-4000:] if log else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


@pytest.mark.slow  # ~70 s on 2 busy cores, most of it the server's start
@pytest.mark.timeout(600)
def test_retry_after_kill_crashes_first_attempt_task_runs(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Crashed

    from tests.live_server import REPO, live_prefect_server

    t0 = time.time()
    with (
        live_prefect_server(tmp_path) as server,
        temporary_settings({PREFECT_API_URL: server.api_url}),
    ):
        t_server = time.time() - t0
        block, marker = tmp_path / "block", tmp_path / "marker"
        block.write_text("")
        log = tmp_path / "attempt1.log"
        code = (
            "from tests.test_crash_hygiene import tiny_flow; "
            f"tiny_flow(block_file={str(block)!r}, marker={str(marker)!r})"
        )
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", code],
                env=server.env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            fid = _wait(
                lambda: marker.exists() and marker.read_text().strip(),
                240,
                "the first attempt to block in its task",
                proc,
                log,
            )
            time.sleep(1.0)  # let the task's Running state and artifact reach the API
            os.killpg(proc.pid, signal.SIGKILL)  # kill -9 of the flow-run process
            proc.wait(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        t_kill = time.time() - t0

        def task_runs(client):
            return {
                (tr.name.split("-")[1], tr.flow_run_run_count): tr
                for tr in client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fid]))
                )
            }

        with get_client(sync_client=True) as client:
            before = task_runs(client)
            assert before[("quick", 1)].state.type.value == "COMPLETED"
            assert before[("blocker", 1)].state.type.value == "RUNNING"  # the zombie
            assert client.read_flow_run(fid).state.type.value == "RUNNING"
            # What the zombie automation does to it (a retry needs a final state).
            client.set_flow_run_state(fid, Crashed(message="test: heartbeats stopped"), force=True)

        block.unlink()  # the second attempt's blocker returns at once
        retry = server.prefect(
            "flow-run",
            "retry",
            fid,
            "--entrypoint",
            f"{HERE.relative_to(REPO)}:tiny_flow",
            timeout=300,
        )
        t_retry = time.time() - t0

        with get_client(sync_client=True) as client:
            fr = client.read_flow_run(fid)
            assert fr.state.type.value == "COMPLETED", retry.stdout + retry.stderr
            assert fr.run_count == 2
            after = task_runs(client)
            old = after[("blocker", 1)]
            assert old.state.type.value == "CRASHED", old.state
            assert SUPERSEDED in old.state.message and "attempt 1" in old.state.message
            assert old.state.message.endswith("attempt 2")
            assert after[("quick", 1)].state.type.value == "COMPLETED"  # untouched
            for name in ("quick", "blocker"):
                assert after[(name, 2)].state.type.value == "COMPLETED"
            arts = {
                a.task_run_id: a
                for a in client.read_artifacts(
                    artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[fid]))
                )
                if a.type == "progress"
            }
            assert arts[old.id].data == 40.0
            assert arts[old.id].description.startswith("blocker: 2/5 batches")
            assert SUPERSEDED in arts[old.id].description
            live = arts[after[("blocker", 2)].id]
            assert live.data == 100.0 and SUPERSEDED not in live.description

            # A third run of the hygiene finds nothing more to do.
            again = crash_leftovers(fid, client=client)
            assert not again and again.attempt == 2

    print(
        f"timings: server {t_server:.1f} s, attempt 1 killed at {t_kill:.1f} s, "
        f"retry done at {t_retry:.1f} s, total {time.time() - t0:.1f} s"
    )


def test_outside_a_flow_run_does_nothing():
    """Called outside a flow run (e.g. `distill.fn(...)` in a test) it needs no API."""
    done = crash_leftovers()
    assert not done and done.flow_run_id is None and done.task_runs == []


def test_distill_calls_it_first():
    import inspect

    from flows.distill import distill

    body = inspect.getsource(distill.fn).split('"""')[-1]
    first = next(line.strip() for line in body.splitlines() if line.strip() and "#" not in line)
    assert first == "crash_leftovers()"
