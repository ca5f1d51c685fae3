"""The random-real baseline: IPC real training images per class, drawn at random (seeded),
labelled by the same ensemble with the same augmentation seeds, and validated by the same
students as the distilled set. Every distillation method must beat it (issue 4's report)."""

from __future__ import annotations

import torch

from d3s_core.labelling import derive_seed
from storage.arrays import create_images, write_image_batch
from storage.run import BASELINE, Run, images_of

from .common import Progress, class_of_each, data_splits, no_progress
from .labels import label_run
from .synthesis import distilled_classes
from .validation import validate


def random_real_subset(run: Run) -> str:
    """Write the baseline image set (same classes and order as the distilled set)."""
    rel = images_of(BASELINE)
    if run.manifest.is_recorded(rel):
        run.manifest.verify(rel)
        return run.fs.url(rel)
    cfg, p = run.config, run.config.preset_obj()
    train, _, _ = data_splits(run)
    y = class_of_each(train)
    classes = distilled_classes(p.num_classes, cfg.synthesis.ipc)
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, 400))
    chosen: dict[int, list[int]] = {}
    for c in range(p.num_classes):
        pool = torch.nonzero(y == c).flatten()
        if len(pool) < cfg.synthesis.ipc:
            raise ValueError(
                f"class {c} has {len(pool)} training images, fewer than IPC {cfg.synthesis.ipc}"
            )
        chosen[c] = pool[torch.randperm(len(pool), generator=g)[: cfg.synthesis.ipc]].tolist()
    order = [chosen[c].pop(0) for c in classes.tolist()]
    images = torch.stack([train[i][0] for i in order])
    shape = (p.in_chans, p.image_size, p.image_size)
    create_images(
        run.fs,
        rel,
        len(classes),
        shape,
        len(classes),
        classes,
        {
            "mean": list(p.mean),
            "std": list(p.std),
            "space": "normalised",
            "kind": "random real subset",
            "train_indices": order,
        },
    )
    write_image_batch(run.fs, rel, 0, images)
    run.manifest.record(rel, "baseline")
    return run.fs.url(rel)


def baseline_real(run: Run, progress: Progress = no_progress) -> str:
    random_real_subset(run)
    label_run(run, progress, BASELINE)
    return validate(run, progress, BASELINE)
