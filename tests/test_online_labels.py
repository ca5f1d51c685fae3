"""`labels.format: online`: no label files; each student step labels its batch with the
teachers, on the same recorded augmentation (the same seeds and code) as the stored epochs."""

import json
import os
import random
import subprocess

import pytest
import torch

from storage.config import parse_config
from storage.labels import read_epoch_batches
from storage.run import labels_epoch, open_run
from tasks.stage_table import enabled, resolve
from tasks.stages.common import load_teachers
from tasks.stages.labels import online_epoch

from .configs import CONFIG, SMALL
from .helpers import REPO, checksums, run_killed, stage_cmd

STORED = {**SMALL, "name": "online", "labels": {**SMALL["labels"], "format": "fp32"}}
ONLINE = {**STORED, "labels": {**STORED["labels"], "format": "online"}}


def run_all(root, config):
    cfg = parse_config(config)
    with open_run(root, cfg) as run:
        for stage in enabled(cfg):
            resolve(stage.runner)(run)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    root = tmp_path_factory.mktemp("online") / "stored"
    run_all(root, STORED)
    return root


def test_online_batches_are_the_stored_fp32_epochs(stored):
    """Per label batch: the same rows, crops and flips, the same logits within float32
    rounding, and the image rows the stored path reads for it."""
    with open_run(stored, parse_config(STORED)) as run:
        teachers = load_teachers(run)
        for e in range(run.config.labels.epochs):
            online = list(online_epoch(run, teachers, e))
            kept = list(read_epoch_batches(run.fs, labels_epoch(e), e))
            assert len(online) == len(kept) > 0
            for (rows, got), want in zip(online, kept, strict=True):
                assert torch.equal(got.image_index, want.image_index)
                assert torch.equal(got.boxes, want.boxes) and torch.equal(got.flips, want.flips)
                assert len(rows) == len(got.image_index)
                torch.testing.assert_close(got.logits, want.logits, rtol=1e-6, atol=1e-6)


def test_an_online_run_stores_no_labels_and_trains_the_same_students(stored, tmp_path):
    root = tmp_path / "run"
    run_all(root, ONLINE)  # the same teachers (seeded, one process) and images
    assert not (root / "labels").exists()
    manifest = json.loads((root / "manifest.json").read_text())["artifacts"]
    metrics = [k for k in manifest if k.startswith("validation/") and k.endswith("metrics.json")]
    assert metrics and all(manifest[k]["labels"] == "online" for k in metrics)
    summary = json.loads((root / "validation" / "summary.json").read_text())
    want = json.loads((stored / "validation" / "summary.json").read_text())
    # The same logits within float32 rounding: the students' accuracy agrees within one std
    # (here: to the student, as the inputs agree to the bit on one CPU in one process).
    assert abs(summary["mean"] - want["mean"]) <= max(want["std"], 1e-9)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_student_killed_mid_epoch_online_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """Real SIGKILL inside the validation stage of an online run (students of 6 epochs, a
    checkpoint after each), then the stage again: every artifact's checksum (the students'
    weights included) is the uninterrupted online run's."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    config = {**CONFIG, "name": "online-kill", "labels": {**CONFIG["labels"], "format": "online"}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    reference = tmp_path / "reference"
    run_all(reference, config)
    killed = tmp_path / "killed"
    for stage in ("data", "teachers", "stats", "synthesis"):
        subprocess.run(stage_cmd(killed, path, stage), cwd=REPO, check=True)
    rng = random.Random(int(os.environ.get("D3S_KILL_SEED", "0")))
    assert run_killed(killed, path, "validation", rng), "the kill came too late to interrupt"
    assert not (killed / "labels").exists()
    assert checksums(killed) == checksums(reference)
