"""The random-real baseline: real training images of the right classes, labelled and
validated exactly like the distilled set."""

import numpy as np
import torch
import zarr

from storage.arrays import train_indices
from storage.config import parse_config
from storage.fs import RunFS
from storage.run import BASELINE, images_of, labels_epoch, open_run, summary_of
from tasks.stages import EXTRA_STAGES, STAGES
from tasks.stages.common import data_splits

from .configs import SMALL


def test_random_real_baseline(tmp_path):
    cfg = parse_config(
        {**SMALL, "validation": {"students": 1, "epochs": 1, "random_real_baseline": True}}
    )
    torch.set_num_threads(1)
    with open_run(tmp_path, cfg) as run:
        for name in ("data", "teachers", "stats"):
            STAGES[name](run)
        EXTRA_STAGES["baseline"](run)
        train, _, _ = data_splits(run)
        done = run.manifest.entries()
    g = zarr.open_group(str(tmp_path / images_of(BASELINE)), mode="r")
    images, classes = np.asarray(g["images"][:]), np.asarray(g["classes"][:])
    picks = train_indices(RunFS(tmp_path), images_of(BASELINE)).tolist()
    assert len(set(picks)) == len(picks) == 10
    for row, i in enumerate(picks):
        x, y = train[i]
        assert np.array_equal(images[row], x.numpy()) and classes[row] == y
    assert {labels_epoch(0, BASELINE), labels_epoch(1, BASELINE), summary_of(BASELINE)} <= set(done)
    assert "synthesis/images.zarr" not in done  # independent of synthesis
