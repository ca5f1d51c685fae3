"""Stage 4: ensemble soft labels (Alg. 2), one Parquet file per epoch.

Each epoch depends only on the images, the teachers and (seed, epoch), so epochs can be written
by Dask workers in parallel (tasks/dask_stages.py): a worker writes its epoch's file atomically
and nothing else; this runner, which holds the run's lock, checks each such file reads back
whole and records it in the manifest, and labels the epochs still missing itself."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from d3s_core.labelling import EpochLabels, epoch_batches, label_batches
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
    lc = run.config.labels
    if images is None:
        n = image_count(run.fs, images_of(prefix))
        rows = _epoch_rows(run, n, e, prefix, workers)
    else:
        n = len(images)
        batches = epoch_batches(n, lc.batch_size, run.config.seed, e)
        rows = (images[b.to(images.device)] for b in batches)
    labelled = _labelled(run, teachers, n, e, rows)
    # The heap is trimmed once the batches' buffers (at ImageNet-21K shape an 8 MiB batch of
    # logits) pile up in it by more than common.TRIM_SLACK_MIB over the epoch (common.trimmed).
    fmt = lc.format
    if fmt == "online":
        raise ValueError("labels.format is 'online': label epochs are never written")
    write_epoch_batches(run.fs, labels_epoch(e, prefix), trimmed(labelled), fmt, lc.topk)


def online_epoch(
    run: Run, teachers: list[torch.nn.Module], e: int, prefix: str = ""
) -> Iterator[tuple[torch.Tensor, EpochLabels]]:
    """(image rows, labels) of each label batch of epoch e, computed now (`labels.format:
    online`): the same batches, crops, flips and ensemble logits the stored epoch holds (the
    same seeds and code), for a student to train on as it goes. Memory: the M teachers and one
    batch of rows and logits (plus the DataLoader's read-ahead), never the epoch."""
    n = image_count(run.fs, images_of(prefix))
    seen: list[torch.Tensor] = []

    def tapped() -> Iterator[torch.Tensor]:  # each batch's rows, kept for its student step
        for x in _epoch_rows(run, n, e, prefix, None):
            seen.append(x)
            yield x

    for lab in _labelled(run, teachers, n, e, tapped()):
        yield seen.pop(0), lab


def _epoch_rows(
    run: Run, n: int, e: int, prefix: str, workers: int | None
) -> Iterator[torch.Tensor]:
    """The image rows of each label batch of epoch e, streamed from the set's store."""
    cfg = run.config
    return row_batches(
        run.fs,
        images_of(prefix),
        [b.tolist() for b in epoch_batches(n, cfg.labels.batch_size, cfg.seed, e)],
        cfg.device,
        cfg.stats.workers if workers is None else workers,
    )


def _labelled(
    run: Run, teachers: list[torch.nn.Module], n: int, e: int, rows: Iterable[torch.Tensor]
) -> Iterator[EpochLabels]:
    """Alg. 2 on each batch of rows: the labellers' (all M, or teacher 0) mean logits."""
    cfg, pl = run.config, recipe(run).labels
    lc = cfg.labels
    labellers = teachers if lc.teachers == "ensemble" else teachers[:1]
    scale = (pl.min_crop_scale, 1.0)
    return label_batches(n, rows, labellers, e, cfg.seed, lc.batch_size, scale, pl.flip)


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
    lc, fmt = cfg.labels, cfg.labels.format
    if fmt == "online":
        raise ValueError(
            "labels.format is 'online': no labels are stored (each student step labels its "
            "batch with the teachers); there is no labels stage to run"
        )
    run.manifest.verify(images_of(prefix))
    if not all(run.manifest.is_recorded(labels_epoch(e, prefix)) for e in range(lc.epochs)):
        write_schema(run.fs, fmt, p.num_classes, lc.topk, prefix)
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
