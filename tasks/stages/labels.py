"""Stage 4: ensemble soft labels (Alg. 2), one Parquet file per epoch."""

from __future__ import annotations

from d3s_core.labelling import label_epoch
from storage.arrays import read_images
from storage.labels import write_epoch, write_schema
from storage.run import Run, images_of, labels_epoch

from .common import Progress, load_teachers, no_progress


def label_run(run: Run, progress: Progress = no_progress, prefix: str = "") -> str:
    """Label the distilled set (prefix "") or another image set under `prefix`."""
    cfg, p = run.config, run.config.preset_obj()
    lc, pl = cfg.labels, p.labels
    run.manifest.verify(images_of(prefix))
    todo = []
    for e in range(lc.epochs):
        if run.manifest.is_recorded(labels_epoch(e, prefix)):
            run.manifest.verify(labels_epoch(e, prefix))  # done is done, but checked
        else:
            todo.append(e)
    if todo:
        images, _ = read_images(run.fs, images_of(prefix))
        images = images.to(cfg.device)
        teachers = load_teachers(run)
        write_schema(run.fs, lc.format, p.num_classes, lc.topk, prefix)
        for e in todo:
            lab = label_epoch(
                images, teachers, e, cfg.seed, lc.batch_size, (pl.min_crop_scale, 1.0), pl.flip
            )
            write_epoch(run.fs, labels_epoch(e, prefix), lab, lc.format, lc.topk)
            run.manifest.record(labels_epoch(e, prefix), "labels", epoch=e)
            progress("labels", (e + 1) / lc.epochs, {"epoch": e})
    return run.fs.url(f"{prefix}labels")
