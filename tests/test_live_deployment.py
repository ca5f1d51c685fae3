"""The README's Prefect walk-through, run against a real `prefect server start`.

Process work pool `d3s-gpu` -> `prefect deploy` of deployments/prefect.yaml (demo-mnist) ->
the zombie automation from deployments/zombie-automation.yaml -> `prefect worker start` on
queue gpu-0 -> `prefect deployment run` (with a tiny config) to Completed. Then a second run
whose worker is SIGKILLed with its flow-run process mid-synthesis (a lost machine): the
automation marks it Crashed once its heartbeats stop, `prefect flow-run retry` hands it to a new
worker, and it completes, reusing the finished stages and resuming the synthesis batch from
its checkpoint.

The automation is created from the shipped file with only `within` shortened (heartbeats come
every 30 s, Prefect's minimum, from the deployment's job variables). With
D3S_LIVE_NO_AUTOMATION=1 the automation is not created, and the test must fail: the killed run
stays Running (this is how it was checked that Crashed comes from the automation).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from .configs import SMALL
from .live_server import PREFECT, REPO, LiveServer, live_prefect_server

AUTOMATION = REPO / "deployments" / "zombie-automation.yaml"
DEPLOYMENTS = REPO / "deployments" / "prefect.yaml"
WITHIN = 60  # seconds without a heartbeat before Crashed (shipped: 120; heartbeats every 30 s)
NO_AUTOMATION = os.environ.get("D3S_LIVE_NO_AUTOMATION") == "1"

# Long enough a synthesis that the kill lands inside it (about 35 ms an iteration here).
ZOMBIE = {
    **SMALL,
    "name": "live-zombie",
    "synthesis": {
        "ipc": 1,
        "batch_size": 10,
        "checkpoint_every": 20,
        "checkpoint_seconds": 0,
        "params": {"iterations": 600},
    },
}


def api(server: LiveServer, method: str, path: str, body: dict | None = None):
    req = urllib.request.Request(
        f"{server.api_url}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def state_of(server: LiveServer, flow_run_id: str) -> str:
    return api(server, "GET", f"/flow_runs/{flow_run_id}")["state"]["type"]


def wait_for_state(server, flow_run_id, wanted, timeout, logs=()):
    deadline = time.time() + timeout
    state = None
    while time.time() < deadline:
        state = state_of(server, flow_run_id)
        if state in wanted:
            return state
        if state in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
            break
        time.sleep(1)
    tails = "\n".join(f"--- {p}:\n{Path(p).read_text()[-6000:]}" for p in logs)
    raise AssertionError(f"flow run {flow_run_id} is {state}, wanted {wanted}\n{tails}")


def start_worker(server: LiveServer, log: Path) -> subprocess.Popen:
    # Its own session, so that killing its process group is like losing the machine.
    with open(log, "a") as out:
        return subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", "d3s-gpu", "--work-queue", "gpu-0"],
            env=server.env | {"PREFECT_WORKER_QUERY_SECONDS": "2"},
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def kill_tree(proc: subprocess.Popen) -> list[int]:
    """SIGKILL the worker's process group and every process below it (its flow runs)."""
    try:
        below = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        below = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for p in below:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()
    psutil.wait_procs(below, timeout=10)
    return [p.pid for p in below]


def run_deployment(server: LiveServer, root: Path, config: dict) -> str:
    out = server.prefect(
        "deployment",
        "run",
        "d3s-distill/demo-mnist",
        "--params",
        json.dumps({"root": str(root), "config": config}),
    )
    return re.search(r"UUID:\s*([0-9a-f-]{36})", out.stdout).group(1)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_deploy_worker_run_zombie_crash_and_retry(tmp_path):
    workers: list[subprocess.Popen] = []
    with live_prefect_server(tmp_path) as server:
        server.env["D3S_REPO"] = str(REPO)  # the deployment's pull step: set_working_directory
        try:
            _walkthrough(server, tmp_path, workers)
        finally:
            for w in workers:
                if w.poll() is None:
                    kill_tree(w)


def _walkthrough(server: LiveServer, tmp_path: Path, workers: list) -> None:
    wlog = tmp_path / "worker.log"
    logs = (wlog, server.log)
    t0 = time.time()
    server.prefect("work-pool", "create", "d3s-gpu", "--type", "process")
    server.prefect("--no-prompt", "deploy", "--prefect-file", str(DEPLOYMENTS), "--all")
    names = {d["name"] for d in api(server, "POST", "/deployments/filter", {})}
    assert names == {d["name"] for d in yaml.safe_load(DEPLOYMENTS.read_text())["deployments"]}
    dep = api(server, "GET", "/deployments/name/d3s-distill/demo-mnist")
    assert dep["work_queue_name"] == "gpu-0"
    assert dep["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
    assert dep["schedules"][0]["schedule"]["cron"] == "0 2 * * *"

    spec = yaml.safe_load(AUTOMATION.read_text())
    assert spec["trigger"]["within"] == 120
    spec["trigger"]["within"] = WITHIN
    (tmp_path / "zombie-automation.yaml").write_text(yaml.safe_dump(spec))
    if not NO_AUTOMATION:
        server.prefect(
            "automation", "create", "--from-file", str(tmp_path / "zombie-automation.yaml")
        )

    workers.append(start_worker(server, wlog))
    print(f"[{time.time() - t0:.0f} s] pool, deployment, automation, worker")

    # A run of the deployment, with the tiny config instead of the demo's.
    root = tmp_path / "small"
    fr = run_deployment(server, root, {**SMALL, "name": "live-small"})
    wait_for_state(server, fr, {"COMPLETED"}, 600, logs)
    print(f"[{time.time() - t0:.0f} s] first run Completed")
    assert json.loads((root / "validation" / "summary.json").read_text())["students"] == 1
    assert "live-small" in server.prefect("flow-run", "inspect", fr).stdout
    assert "Finished in state Completed" in server.prefect("flow-run", "logs", fr).stdout

    # The zombie: worker and flow run killed mid-synthesis.
    root = tmp_path / "zombie"
    fr = run_deployment(server, root, ZOMBIE)
    marker = root / "synthesis" / "checkpoint" / "state.json"
    deadline = time.time() + 600
    while not marker.exists() and time.time() < deadline:
        assert state_of(server, fr) in {"SCHEDULED", "PENDING", "RUNNING"}
        time.sleep(0.05)
    assert marker.exists() and state_of(server, fr) == "RUNNING"
    teacher = root / "teachers" / "teacher_0.safetensors"
    teacher_mtime = teacher.stat().st_mtime_ns
    killed = kill_tree(workers[0])
    t_kill = time.time()
    print(f"[{t_kill - t0:.0f} s] killed the worker and {killed}")
    assert killed, "the flow run was not a child of the worker"
    assert not list((root / "synthesis" / "batches").glob("*.json"))
    heartbeats = api(
        server,
        "POST",
        "/events/filter",
        {
            "filter": {
                "event": {"name": ["prefect.flow-run.heartbeat"]},
                "resource": {"id": [f"prefect.flow-run.{fr}"]},
            }
        },
    )
    assert heartbeats["total"] >= 1

    wait_for_state(server, fr, {"CRASHED"}, WITHIN + 60, logs)
    print(f"[{time.time() - t0:.0f} s] Crashed {time.time() - t_kill:.0f} s after the kill")
    assert "Heartbeats stopped" in api(server, "GET", f"/flow_runs/{fr}")["state"]["message"]

    server.prefect("flow-run", "retry", fr)
    workers.append(start_worker(server, wlog))
    wait_for_state(server, fr, {"COMPLETED"}, 600, logs)
    print(f"[{time.time() - t0:.0f} s] retried run Completed")
    assert (root / "validation" / "summary.json").exists()
    assert teacher.stat().st_mtime_ns == teacher_mtime  # finished stages reused
    records = [json.loads(p.read_text()) for p in (root / "synthesis" / "batches").glob("*.json")]
    assert records and all((r["resumed_from_iteration"] or 0) > 0 for r in records)
    assert api(server, "GET", f"/flow_runs/{fr}")["run_count"] >= 2
