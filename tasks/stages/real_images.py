"""Image stores of real training images: the baselines' sets (the random-real subset,
tasks/stages/baseline.py; the coreset selections, tasks/stages/coreset.py), written in the
distilled set's layout with the training sample of each row (`train_indices`)."""

from __future__ import annotations

import torch

from storage.arrays import create_images, write_image_batch, write_train_indices
from storage.run import Run

from .common import data_splits, index_batches
from .recipe import recipe
from .working_set import F32, Phase, Work, phase


def real_subset_working_set(w: Work) -> dict[str, Phase]:
    """A real-image set written one synthesis-batch-sized chunk at a time: the chunk, the
    per-class training rows (int64), the per-image classes and picks (16 bytes an image)."""
    b = w.cfg.synthesis.batch_size
    chunk = b * w.chw * F32
    host = {
        **w.loader(b),
        "chunk (float32)": chunk,
        "per-class training rows (int64)": w.n_train * 8,
        "per-image classes + picks": w.n * 16,
    }
    return {"subset": phase(host, {"chunk (float32)": chunk})}


def write_real_set(
    run: Run,
    rel: str,
    order: torch.Tensor,
    classes: torch.Tensor,
    kind: str,
    stage: str,
    attrs: dict | None = None,
) -> str:
    """Write an image store of real training images: row r is training sample order[r], of
    class classes[r] (the distilled set's class order), with its `train_indices`; read one
    synthesis-batch-sized chunk at a time through the run's DataLoader path (memory: one
    chunk), then recorded in the manifest under `stage`. `attrs`: more store attributes."""
    cfg, p = run.config, recipe(run)
    train, _, _ = data_splits(run)
    bsz = cfg.synthesis.batch_size
    shape = (p.in_chans, p.image_size, p.image_size)
    attrs = {
        "mean": list(p.mean),
        "std": list(p.std),
        "space": "normalised",
        "kind": kind,
        **(attrs or {}),
    }
    create_images(run.fs, rel, len(classes), shape, bsz, classes, attrs)
    write_train_indices(run.fs, rel, order)
    chunks = [chunk.tolist() for chunk in order.split(bsz)]
    for k, (x, y) in enumerate(index_batches(run, train, chunks)):
        want = classes[k * bsz : k * bsz + len(y)].to(y.device)
        if not torch.equal(y, want):
            raise ValueError(f"{run.fs.url(rel)}: rows {k * bsz}.. are not of their classes")
        write_image_batch(run.fs, rel, k * bsz, x)
    run.manifest.record(rel, stage)
    return run.fs.url(rel)
