"""Real SIGKILL inside every stage, then resume: the finished artifacts are bit-identical to an
uninterrupted run (same checksums in the manifest)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage.config import parse_config
from storage.run import open_run
from tasks.stages import STAGES

from .configs import CONFIG
from .helpers import checksums

# A file that exists only while the stage is part-way through its work.
IN_PROGRESS = {
    "teachers": "teachers/checkpoints/teacher_0.json",
    "stats": "stats_shards/teacher_0/shard_000000.json",
    "synthesis": "synthesis/checkpoint/state.json",
    "labels": "labels/epoch=0/part-0.parquet",
    "validation": "validation/small_resnet-seed0/checkpoint.json",
}
REPO = Path(__file__).resolve().parents[1]


def stage_cmd(root, config_path, stage):
    return [sys.executable, "-m", "flows.cli", stage, str(config_path), "--root", str(root)]


def run_killed(root, config_path, stage, rng):
    """Start the stage, SIGKILL it shortly after it is part-way through, then run it again to
    the end. Returns True if the kill landed while the stage was unfinished."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        stage_cmd(root, config_path, stage),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    marker = Path(root) / IN_PROGRESS[stage]
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    # The statistics pass of this tiny config lasts a fraction of a second: kill it sooner.
    time.sleep(rng.uniform(0.0, 0.05 if stage == "stats" else 0.4))
    landed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(
        stage_cmd(root, config_path, stage), cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return landed


@pytest.mark.timeout(900)
def test_sigkill_inside_every_stage_then_resume_is_bit_identical(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(CONFIG))
    cfg = parse_config(CONFIG)
    reference = tmp_path / "reference"
    import torch

    torch.set_num_threads(1)
    with open_run(reference, cfg) as run:
        for fn in STAGES.values():
            fn(run)
    killed = tmp_path / "killed"
    rng = random.Random(int(os.environ.get("D3S_KILL_SEED", "0")))
    subprocess.run(stage_cmd(killed, config_path, "data"), cwd=REPO, check=True)
    landed = {stage: run_killed(killed, config_path, stage, rng) for stage in IN_PROGRESS}
    assert all(landed.values()), f"a kill came too late to interrupt: {landed}"
    ref, got = checksums(reference), checksums(killed)
    assert len(ref) == 2 * 2 + 2 + 1 + 6 + 2 * 2 + 1
    assert got == ref
    # No checkpoint or temporary file is left behind.
    leftovers = [p for p in killed.rglob("*") if ".tmp-" in p.name or "checkpoint" in p.name]
    assert leftovers == [] or all(p.is_dir() and not any(p.iterdir()) for p in leftovers)
