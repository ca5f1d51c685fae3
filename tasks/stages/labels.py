"""Stage 4: ensemble soft labels (Alg. 2), one Parquet file per epoch.

Each epoch depends only on the images, the teachers and (seed, epoch), so epochs can be written
by Dask workers in parallel (tasks/dask_stages.py): a worker writes its epoch's file atomically
and nothing else; this runner, which holds the run's lock, checks each such file reads back
whole and records it in the manifest, and labels the epochs still missing itself."""

from __future__ import annotations

import torch

from d3s_core.labelling import epoch_batches, label_batches
from d3s_core.precision import enable_cudnn_autotune
from storage.arrays import image_count, row_batches
from storage.labels import read_epoch_batches, write_epoch_batches, write_schema
from storage.run import Run, images_of, labels_epoch

from ..terminal import Count
from .common import Progress, load_teachers, no_progress, trimmed
from .recipe import recipe
from .working_set import EPOCH_INDEX_BYTES, F32, Phase, Work, phase


def missing_epochs(run: Run, prefix: str = "") -> list[int]:
    """Epochs with no file yet (neither recorded nor written by a worker)."""
    return [
        e
        for e in range(run.config.labels.epochs)
        if not run.manifest.is_recorded(labels_epoch(e, prefix))
        and not run.fs.exists(labels_epoch(e, prefix))
    ]


def write_one_epoch(
    run: Run,
    images: torch.Tensor | None,
    teachers: list[torch.nn.Module],
    e: int,
    prefix: str = "",
    workers: int | None = None,
) -> None:
    """Label epoch e and write its file (atomic; touches no other file, so it is safe on a
    worker without the run lock). `teachers`: all M; labels.teachers "single" uses teacher 0.

    images: None streams the rows of each label batch from the image store `images_of(prefix)`
    (`workers` DataLoader processes read ahead, default `stats.workers`) and writes each
    batch's labels as they come: one label batch of images and logits in memory at a time. A
    (N, C, H, W) tensor labels those images instead (small sets and tests)."""
    cfg, pl = run.config, recipe(run).labels
    lc = cfg.labels
    labellers = teachers if lc.teachers == "ensemble" else teachers[:1]
    if images is None:
        n = image_count(run.fs, images_of(prefix))
        rows = row_batches(
            run.fs,
            images_of(prefix),
            [b.tolist() for b in epoch_batches(n, lc.batch_size, cfg.seed, e)],
            cfg.device,
            cfg.stats.workers if workers is None else workers,
        )
    else:
        n = len(images)
        rows = (images[b.to(images.device)] for b in epoch_batches(n, lc.batch_size, cfg.seed, e))
    labelled = label_batches(
        n, rows, labellers, e, cfg.seed, lc.batch_size, (pl.min_crop_scale, 1.0), pl.flip
    )
    # The heap is trimmed once the batches' buffers (at ImageNet-21K shape an 8 MiB batch of
    # logits) pile up in it by more than common.TRIM_SLACK_MIB over the epoch (common.trimmed).
    write_epoch_batches(run.fs, labels_epoch(e, prefix), trimmed(labelled), lc.format, lc.topk)


def _reads_back(run: Run, rel: str, e: int) -> None:
    """A worker's file is whole (atomic) and must read back: every row group, one at a time."""
    for _ in read_epoch_batches(run.fs, rel, e):
        pass


def labels_working_set(w: Work) -> dict[str, Phase]:
    """A label batch: the M teachers, its rows and crops through one teacher, the logits of
    each labeller and their mean; on the host the prefetched rows, the batch on its way to
    Parquet and the epoch's index vectors."""
    cfg, f = w.cfg, w.teacher
    b, k = cfg.labels.batch_size, w.p.num_classes
    img = w.chw * F32
    m = cfg.teachers.count
    lab = m if cfg.labels.teachers == "ensemble" else 1
    device = {
        "M x teacher weights": m * f.weight_bytes,
        "batch x (rows + crops + forward)": b * (2 * img + f.forward_live),
        "logits (each labeller + mean)": b * k * F32 * (lab + 2),
    }
    host = {
        "prefetched image rows (workers x 2 + 1)": w.prefetch * b * img,
        "label batch on its way to Parquet": b * k * F32 * 4,
        "per-image index vectors": w.n * EPOCH_INDEX_BYTES,
    }
    return {"label": phase(host, device)}


def label_run(run: Run, progress: Progress = no_progress, prefix: str = "") -> str:
    """Label the distilled set (prefix "") or another image set under `prefix`, streaming the
    images of each label batch from the store (no epoch or image set is held whole)."""
    cfg, p = run.config, recipe(run)
    lc = cfg.labels
    run.manifest.verify(images_of(prefix))
    if not all(run.manifest.is_recorded(labels_epoch(e, prefix)) for e in range(lc.epochs)):
        write_schema(run.fs, lc.format, p.num_classes, lc.topk, prefix)
    done = sum(run.manifest.is_recorded(labels_epoch(e, prefix)) for e in range(lc.epochs))
    progress("labels", done / lc.epochs, {"epoch": Count(done, lc.epochs)})
    teachers = None
    for e in range(lc.epochs):
        rel = labels_epoch(e, prefix)
        if run.manifest.is_recorded(rel):
            run.manifest.verify(rel)  # done is done, but checked
            continue
        if run.fs.exists(rel):  # written by a worker
            _reads_back(run, rel, e)
        else:
            if teachers is None:
                enable_cudnn_autotune(cfg.device)
                teachers = load_teachers(run)
            write_one_epoch(run, None, teachers, e, prefix)
        run.manifest.record(rel, "labels", epoch=e)
        done += 1  # epoch e, 1-based e + 1 (its file keeps epoch=e)
        progress("labels", done / lc.epochs, {"epoch": Count(e + 1, lc.epochs)})
    return run.fs.url(f"{prefix}labels")
