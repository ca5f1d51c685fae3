"""Stage 4: ensemble soft labels (Alg. 2), one Parquet file per epoch.

Each epoch depends only on the images, the teachers and (seed, epoch), so epochs can be written
by Dask workers in parallel (tasks/dask_stages.py): a worker writes its epoch's file atomically
and nothing else; this runner, which holds the run's lock, checks each such file reads back
whole and records it in the manifest, and labels the epochs still missing itself."""

from __future__ import annotations

import torch

from d3s_core.labelling import label_epoch
from d3s_core.precision import enable_cudnn_autotune
from storage.arrays import read_images
from storage.labels import read_epoch, write_epoch, write_schema
from storage.run import Run, images_of, labels_epoch

from .common import Progress, load_teachers, no_progress


def missing_epochs(run: Run, prefix: str = "") -> list[int]:
    """Epochs with no file yet (neither recorded nor written by a worker)."""
    return [
        e
        for e in range(run.config.labels.epochs)
        if not run.manifest.is_recorded(labels_epoch(e, prefix))
        and not run.fs.exists(labels_epoch(e, prefix))
    ]


def write_one_epoch(
    run: Run, images: torch.Tensor, teachers: list[torch.nn.Module], e: int, prefix: str = ""
) -> None:
    """Label epoch e and write its file (atomic; touches no other file, so it is safe on a
    worker without the run lock). `teachers`: all M; labels.teachers "single" uses teacher 0."""
    cfg, pl = run.config, run.config.preset_obj().labels
    lc = cfg.labels
    labellers = teachers if lc.teachers == "ensemble" else teachers[:1]
    lab = label_epoch(
        images, labellers, e, cfg.seed, lc.batch_size, (pl.min_crop_scale, 1.0), pl.flip
    )
    write_epoch(run.fs, labels_epoch(e, prefix), lab, lc.format, lc.topk)


def label_run(run: Run, progress: Progress = no_progress, prefix: str = "") -> str:
    """Label the distilled set (prefix "") or another image set under `prefix`."""
    cfg, p = run.config, run.config.preset_obj()
    lc = cfg.labels
    run.manifest.verify(images_of(prefix))
    if not all(run.manifest.is_recorded(labels_epoch(e, prefix)) for e in range(lc.epochs)):
        write_schema(run.fs, lc.format, p.num_classes, lc.topk, prefix)
    images = teachers = None
    for e in range(lc.epochs):
        rel = labels_epoch(e, prefix)
        if run.manifest.is_recorded(rel):
            run.manifest.verify(rel)  # done is done, but checked
            continue
        if run.fs.exists(rel):  # written by a worker: whole (atomic), and it must read back
            read_epoch(run.fs, rel, e)
        else:
            if images is None:
                images, _ = read_images(run.fs, images_of(prefix))
                images = images.to(cfg.device)
                enable_cudnn_autotune(cfg.device)
                teachers = load_teachers(run)
            assert teachers is not None
            write_one_epoch(run, images, teachers, e, prefix)
        run.manifest.record(rel, "labels", epoch=e)
        progress("labels", (e + 1) / lc.epochs, {"epoch": e})
    return run.fs.url(f"{prefix}labels")
