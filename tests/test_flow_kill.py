"""SIGKILL of the flow process mid-synthesis; a new flow run reuses the finished stages and
resumes the batch from its checkpoint. The result equals an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from storage.config import parse_config
from storage.run import open_run
from tasks.stages import STAGES

from .configs import CONFIG
from .helpers import checksums

REPO = Path(__file__).resolve().parents[1]


def flow_cmd(root, config_path):
    return [sys.executable, "-m", "flows.demo", "--root", str(root), "--config", str(config_path)]


@pytest.mark.slow  # the default tier kills every stage: tests/test_resume_kill.py
@pytest.mark.timeout(900)
def test_killed_flow_resumes_the_synthesis_batch(tmp_path):
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(CONFIG))
    reference = tmp_path / "reference"
    torch.set_num_threads(1)
    with open_run(reference, parse_config(CONFIG)) as run:
        for fn in STAGES.values():
            fn(run)

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "OMP_NUM_THREADS": "1",
    }
    root = tmp_path / "killed"
    # Its own session, so the kill takes the ephemeral server with it, as a lost machine would.
    proc = subprocess.Popen(
        flow_cmd(root, config_path),
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = root / "synthesis" / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the flow ended before synthesis was checkpointed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (root / "synthesis" / "batches" / "batch_000002.json").exists()
    finished_before = set(checksums(root))
    assert {"teachers/teacher_0.safetensors", "stats.zarr/teacher_1"} <= finished_before
    teacher_mtime = (root / "teachers" / "teacher_0.safetensors").stat().st_mtime_ns

    done = subprocess.run(
        flow_cmd(root, config_path), cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert checksums(root) == checksums(reference)
    # Finished stages were reused, and the interrupted batch continued from its checkpoint.
    assert (root / "teachers" / "teacher_0.safetensors").stat().st_mtime_ns == teacher_mtime
    records = [json.loads(p.read_text()) for p in (root / "synthesis" / "batches").glob("*.json")]
    assert any((r["resumed_from_iteration"] or 0) > 0 for r in records)
