"""Stage 4: ensemble soft labels (Alg. 2), one Parquet file per epoch."""

from __future__ import annotations

from d3s_core.labelling import label_epoch
from storage.arrays import read_images
from storage.labels import write_epoch, write_schema
from storage.run import SYN_IMAGES, Run, labels_epoch

from .common import Progress, load_teachers, no_progress


def label_run(run: Run, progress: Progress = no_progress) -> str:
    cfg, p = run.config, run.config.preset_obj()
    lc, pl = cfg.labels, p.labels
    run.manifest.verify(SYN_IMAGES)
    todo = []
    for e in range(lc.epochs):
        if run.manifest.is_recorded(labels_epoch(e)):
            run.manifest.verify(labels_epoch(e))  # done is done, but checked
        else:
            todo.append(e)
    if todo:
        images, _ = read_images(run.fs, SYN_IMAGES)
        images = images.to(cfg.device)
        teachers = load_teachers(run)
        write_schema(run.fs, lc.format, p.num_classes, lc.topk)
        for e in todo:
            lab = label_epoch(
                images, teachers, e, cfg.seed, lc.batch_size, (pl.min_crop_scale, 1.0), pl.flip
            )
            write_epoch(run.fs, labels_epoch(e), lab, lc.format, lc.topk)
            run.manifest.record(labels_epoch(e), "labels", epoch=e)
            progress("labels", (e + 1) / lc.epochs, {"epoch": e})
    return run.fs.url("labels")
