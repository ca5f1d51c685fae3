"""Zombie-run detection: deployments/zombie-automation.yaml.

Quick: the file is a valid Prefect automation (the schema `prefect automation create
--from-file` validates it with), its window is 3-4 heartbeats of the deployments' 30 s, it
starts only after a `prefect.flow-run.heartbeat`, and the server's own matching
(`prefect.server.events.schemas.automations.EventTrigger.covers`) takes the events of a
deployment's flow run and ignores those of a flow run started by a plain `python` call (which
in this Prefect sends heartbeats too, every 180 s by default).

Slow: against a real `prefect server start` with the automation created from the shipped file
unchanged, a flow run started by a real process worker (heartbeats every 30 s from the
deployment's job variables) is Crashed within 150 s of its worker and then its process being
SIGKILLed (each by PID), while a flow run started by a plain `python` call next to it stays
Running. A second worker run whose process alone is killed (worker alive) is reported Crashed
by the worker itself, in seconds.

This module is also the deployment's entrypoint, so it imports nothing from `tests` at import
time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from prefect import flow

HERE = Path(__file__).resolve()
REPO_ROOT = HERE.parents[1]
AUTOMATION = REPO_ROOT / "deployments" / "zombie-automation.yaml"
DEPLOYMENTS = REPO_ROOT / "deployments" / "prefect.yaml"
PRESETS = REPO_ROOT / "deployments" / "presets.yaml"  # the paper presets' deployments
HEARTBEAT = "prefect.flow-run.heartbeat"
# With D3S_ZOMBIE_UNSCOPED=1 the automation is created without its `match_related`, and the
# slow test must fail: the plain run (heartbeats every 180 s) is Crashed while alive.
UNSCOPED = "D3S_ZOMBIE_UNSCOPED"
FINAL = {"Completed", "Failed", "Cancelled", "Crashed"}


@flow(name="zombie-sleepy")
def sleepy(marker: str, seconds: float = 600) -> str:
    """Writes its PID to `marker`, then sleeps (a long stage)."""
    Path(marker).write_text(str(os.getpid()))
    deadline = time.time() + seconds
    while time.time() < deadline:
        time.sleep(0.5)
    return "woke"


def spec() -> dict:
    return yaml.safe_load(AUTOMATION.read_text())


def heartbeat_frequencies() -> set[int]:
    deps = []
    for f in (DEPLOYMENTS, PRESETS):
        if f.exists():
            deps += yaml.safe_load(f.read_text())["deployments"]
    return {
        int(d["work_pool"]["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"])
        for d in deps
    }


def test_automation_file_is_a_valid_prefect_automation():
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    a = AutomationCore.model_validate(spec())  # as `prefect automation create --from-file`
    t = a.trigger
    assert isinstance(t, EventTrigger) and t.posture == Posture.Proactive
    assert t.after == {HEARTBEAT}
    assert t.expect == {HEARTBEAT} | {f"prefect.flow-run.{s}" for s in FINAL}
    assert t.for_each == {"prefect.resource.id"} and t.threshold == 1
    assert t.match.model_dump() == {"prefect.resource.id": "prefect.flow-run.*"}
    assert t.match_related.model_dump() == {"prefect.resource.role": "deployment"}
    [act] = a.actions
    assert isinstance(act, ChangeFlowRunState) and act.state.value == "CRASHED"
    assert a.enabled


def test_window_is_three_to_four_heartbeats():
    """Every deployment sends heartbeats every 30 s; the window (from the last heartbeat)
    tolerates three missed ones and detects a dead run within ~2 minutes. It is shorter than
    the 180 s default frequency: safe only because non-deployment runs cannot match."""
    from prefect.events.schemas.automations import AutomationCore

    within = AutomationCore.model_validate(spec()).trigger.within
    assert heartbeat_frequencies() == {30}
    assert timedelta(seconds=90) <= within <= timedelta(seconds=120)
    assert within >= 3 * timedelta(seconds=30)


def test_heartbeat_setting_name(monkeypatch):
    """The name the deployments set is the installed Prefect's flow heartbeat setting (the
    legacy PREFECT_RUNNER_HEARTBEAT_FREQUENCY is an alias of it); its default is 180 s, so
    runs started without it do send heartbeats, every 3 minutes."""
    from prefect.settings import Settings

    monkeypatch.delenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", raising=False)
    monkeypatch.delenv("PREFECT_RUNNER_HEARTBEAT_FREQUENCY", raising=False)
    assert Settings().flows.heartbeat_frequency == 180
    monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")
    assert Settings().flows.heartbeat_frequency == 30


def _event(name: str, run: uuid.UUID, deployment: uuid.UUID | None):
    from prefect.server.events.schemas.events import ReceivedEvent

    related = [
        {
            "prefect.resource.id": f"prefect.flow.{uuid.uuid4()}",
            "prefect.resource.role": "flow",
            "prefect.resource.name": "d3s-distill",
        }
    ]
    if deployment is not None:
        related.append(
            {
                "prefect.resource.id": f"prefect.deployment.{deployment}",
                "prefect.resource.role": "deployment",
            }
        )
    return ReceivedEvent(
        occurred=time.time(),
        event=name,
        resource={"prefect.resource.id": f"prefect.flow-run.{run}"},
        related=related,
        id=uuid.uuid4(),
    )


def test_only_deployment_runs_match():
    """The server's matching: a worker-started (deployment) run's heartbeats and final states
    are taken; a plain `python` run's are ignored, so its 180 s heartbeats never start a
    window it could miss."""
    from prefect.server.events.schemas.automations import Automation

    a = Automation.model_validate({**spec(), "id": uuid.uuid4()})
    t = a.trigger
    run, dep = uuid.uuid4(), uuid.uuid4()
    for name in [HEARTBEAT, *(f"prefect.flow-run.{s}" for s in FINAL)]:
        assert t.covers(_event(name, run, dep)), name
        assert not t.covers(_event(name, run, None)), name
    assert t.starts_after(HEARTBEAT) and t.expects(HEARTBEAT)
    assert not t.covers(_event("prefect.flow-run.Running", run, dep))


# ---------------------------------------------------------------------------------------------
# Slow: a real server, a real worker, a real kill.


def _api(api_url: str, method: str, path: str, body: dict | None = None):
    req = urllib.request.Request(
        f"{api_url}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def _state(api_url: str, fr: str) -> dict:
    return _api(api_url, "GET", f"/flow_runs/{fr}")["state"]


def _heartbeats(api_url: str, fr: str) -> list[str]:
    got = _api(
        api_url,
        "POST",
        "/events/filter",
        {
            "filter": {
                "event": {"name": [HEARTBEAT]},
                "resource": {"id": [f"prefect.flow-run.{fr}"]},
            },
            "limit": 50,
        },
    )
    return sorted(e["occurred"] for e in got["events"])


def _wait(pred, timeout: float, what: str, logs=()):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if v := pred():
            return v
        time.sleep(1)
    tails = "\n".join(f"--- {p}:\n{Path(p).read_text()[-4000:]}" for p in logs)
    raise AssertionError(f"timed out ({timeout} s) waiting for {what}\n{tails}")


def _kill(pid: int, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError):
        (os.killpg if group else os.kill)(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_worker_run_crashed_after_kill_plain_run_left_alone(tmp_path):
    from tests.live_server import PREFECT, REPO, live_prefect_server

    t0 = time.time()
    procs: list[subprocess.Popen] = []
    pids: list[int] = []
    with live_prefect_server(tmp_path) as server:
        api = server.api_url
        try:
            t_server = time.time() - t0
            server.prefect("work-pool", "create", "zpool", "--type", "process")
            automation = AUTOMATION
            if os.environ.get(UNSCOPED) == "1":
                automation = tmp_path / "zombie-automation.yaml"
                automation.write_text(
                    yaml.safe_dump(
                        {
                            **spec(),
                            "trigger": {
                                k: v for k, v in spec()["trigger"].items() if k != "match_related"
                            },
                        }
                    )
                )
            server.prefect("automation", "create", "--from-file", str(automation))

            # A flow run started by a plain `python` call: heartbeats every 180 s (default).
            plain_marker = tmp_path / "plain.pid"
            code = f"from tests.test_zombies import sleepy; sleepy({str(plain_marker)!r}, 900)"
            plain_log = tmp_path / "plain.log"
            with open(plain_log, "w") as out:
                plain = subprocess.Popen(
                    [sys.executable, "-c", code],
                    env=server.env,
                    cwd=REPO,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            procs.append(plain)

            # A deployment whose runs a process worker starts, heartbeats every 30 s.
            marker = tmp_path / "worker-run.pid"
            marker2 = tmp_path / "worker-run-2.pid"
            code = (
                "import json, sys\n"
                "from prefect.client.orchestration import get_client\n"
                "with get_client(sync_client=True) as c:\n"
                "    f = c.create_flow_from_name('zombie-sleepy')\n"
                "    d = c.create_deployment(\n"
                "        flow_id=f, name='zombie', work_pool_name='zpool',\n"
                "        entrypoint='tests/test_zombies.py:sleepy',\n"
                "        pull_steps=[{'prefect.deployments.steps.set_working_directory':\n"
                f"            {{'directory': {str(REPO)!r}}}}}],\n"
                "        job_variables={'env': {'PREFECT_FLOWS_HEARTBEAT_FREQUENCY': '30'}},\n"
                f"        parameters={{'marker': {str(marker)!r}, 'seconds': 900}},\n"
                "    )\n"
                "    print(c.create_flow_run_from_deployment(d).id)\n"
                "    print(c.create_flow_run_from_deployment(\n"
                f"        d, parameters={{'marker': {str(marker2)!r}, 'seconds': 900}}).id)\n"
            )
            out = subprocess.run(
                [sys.executable, "-c", code],
                env=server.env,
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert out.returncode == 0, out.stderr
            fr, fr2 = out.stdout.strip().splitlines()[-2:]
            wlog = tmp_path / "worker.log"
            with open(wlog, "w") as wout:
                worker = subprocess.Popen(
                    [PREFECT, "worker", "start", "--pool", "zpool"],
                    env=server.env | {"PREFECT_WORKER_QUERY_SECONDS": "2"},
                    cwd=REPO,
                    stdout=wout,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            procs.append(worker)
            logs = (wlog, plain_log, server.log)

            pid = int(_wait(lambda: marker.exists() and marker.read_text(), 300, "run", logs))
            pids.append(pid)
            pid2 = int(_wait(lambda: marker2.exists() and marker2.read_text(), 300, "run 2", logs))
            pids.append(pid2)
            _wait(plain_marker.exists, 120, "the plain run", logs)
            plain_fr = None
            for r in _api(api, "POST", "/flow_runs/filter", {}):
                if r["id"] not in (fr, fr2):
                    plain_fr = r["id"]
            assert plain_fr and _state(api, plain_fr)["type"] == "RUNNING"
            # The flow-run process is in its own process group, apart from the worker's.
            assert os.getpgid(pid) == pid != os.getpgid(worker.pid)

            # Run 2's flow-run process killed by PID while its worker lives: the worker sees
            # it exit (-9) and reports the run Crashed itself, in seconds.
            _kill(pid2)
            t_kill2 = time.time()
            _wait(lambda: _state(api, fr2)["type"] == "CRASHED", 60, "run 2 Crashed", logs)
            crashed2_after = time.time() - t_kill2
            msg2 = _state(api, fr2)["message"] or ""
            assert "d3s-crash-zombie-flow-runs" not in msg2, msg2
            _wait(lambda: len(_heartbeats(api, fr)) >= 2, 120, "two heartbeats", logs)
            t_run = time.time() - t0

            # The machine dies: the worker first (so it cannot report the run Crashed), then
            # the flow-run process, each by PID.
            _kill(worker.pid, group=True)
            worker.wait(timeout=30)
            _kill(pid)
            t_kill = time.time()
            last = _heartbeats(api, fr)[-1]
            assert _state(api, fr)["type"] == "RUNNING"

            _wait(lambda: _state(api, fr)["type"] == "CRASHED", 150, "Crashed", logs)
            crashed_after = time.time() - t_kill
            assert "d3s-crash-zombie-flow-runs" in (_state(api, fr)["message"] or "")

            # The plain run: alive, heartbeating (every 180 s), never matched.
            first = _heartbeats(api, plain_fr)
            assert first, "the plain run sent no heartbeat"
            plain_age = lambda: time.time() - os.stat(plain_marker).st_mtime  # noqa: E731
            while plain_age() < 140:  # longer than the window after its first heartbeat
                time.sleep(2)
            assert plain.poll() is None
            assert _state(api, plain_fr)["type"] == "RUNNING"
        finally:
            for p in procs:
                _kill(p.pid, group=True)
            for p in pids:
                _kill(p)
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=20)
    print(
        f"timings: server {t_server:.0f} s, worker run heartbeating at {t_run:.0f} s, "
        f"run 2 (its PID killed, worker alive) Crashed {crashed2_after:.0f} s after: {msg2!r}; "
        f"Crashed {crashed_after:.0f} s after the kill (last heartbeat {last}), "
        f"plain run still Running at {plain_age():.0f} s, total {time.time() - t0:.0f} s"
    )
