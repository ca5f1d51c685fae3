"""Real SIGKILL inside every stage, then resume: the finished artifacts are bit-identical to an
uninterrupted run (same checksums in the manifest)."""

import json
import os
import random
import subprocess

import pytest

from storage.config import parse_config
from storage.run import open_run
from tasks.stages import STAGES

from .configs import CONFIG
from .helpers import IN_PROGRESS, REPO, checksums, run_killed, stage_cmd


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
