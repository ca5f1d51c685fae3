"""Stage 3: batch-wise synthesis (Alg. 1/3) with ISU and ENS, checkpointed inside each batch.

Per batch b: resume the in-progress state if there is one, run to K in steps of
`checkpoint_every` iterations (saving the whole state each time), update the ISU statistics of
every teacher, write the batch's chunk of images.zarr, the ISU statistics, and last the batch's
commit record (checksums of both). A batch without a commit record is redone from its
checkpoint; a committed batch is verified, never recomputed.

Data-parallel (`world`, launched by tasks/distributed_synthesis.py): every rank runs this
function together on its rows of each batch; only rank 0 writes (checkpoints gathered from all
ranks, images, ISU statistics, commit records), every rank reads checkpoints on resume, and a
barrier after each batch's writes keeps the readers behind the writer. The files are the same
as a single process writes, so either can resume the other's checkpoint.
"""

from __future__ import annotations

import logging
import re
import time

import torch
import torchvision

from d3s_core.distributed import World
from d3s_core.isu import RunningStats
from d3s_core.labelling import derive_seed
from d3s_core.precision import enable_cudnn_autotune
from d3s_core.synthesis import (
    MeasuredTeacher,
    RidgeLog,
    SynthesisState,
    finish_batch,
    gather_state,
    init_state,
    run_iterations,
    shard_state,
)
from storage.arrays import (
    ImageRows,
    create_images,
    images_sha256,
    read_image_rows,
    write_image_batch,
)
from storage.manifest import REMEDY, CorruptArtifact
from storage.records import read_batch_record, write_batch_record, write_grid_meta
from storage.run import SYN_CHECKPOINT, SYN_IMAGES, Run, syn_commit, syn_isu
from storage.states import (
    BackgroundSaver,
    has_state,
    remove_state,
    resume_state,
    save_state,
    state_meta,
)

from ..terminal import Count
from ..torchrun import launch
from .common import ClassRows, Progress, class_rows, data_splits, load_teachers, no_progress
from .recipe import recipe
from .stats import load_targets
from .working_set import F32, F64, Phase, Work, phase

log = logging.getLogger("d3s")  # the Prefect task forwards it to the run's log


def distilled_classes(num_classes: int, ipc: int) -> torch.Tensor:
    """Class of each distilled image: every class once, IPC times over, so each synthesis batch
    holds a balanced mix of classes."""
    return torch.arange(num_classes).repeat(ipc)


_ISU = re.compile(r"after_batch_(\d+)\.json$")


def _checkpoint_batch(run: Run) -> int:
    """The batch the synthesis checkpoint belongs to (from its marker; -1 if unreadable)."""
    try:
        return int(state_meta(run.fs, SYN_CHECKPOINT).get("batch", -1))
    except CorruptArtifact:
        return -1


def _as_running(run: Run, state: dict) -> RunningStats:
    stats = RunningStats(state["means"], state["covs"], state["batches_done"], state["images_done"])
    return stats.to(run.config.device)


def _save_running(run: Run, b: int, running: RunningStats) -> None:
    save_state(
        run.fs,
        syn_isu(b),
        {
            "means": running.means,
            "covs": running.covs,
            "batches_done": running.batches_done,
            "images_done": running.images_done,
        },
    )


def _isu_batches(run: Run) -> list[int]:
    """Batches b with an ISU state `isu/after_batch_b` on disk, ascending."""
    if not run.fs.exists("synthesis/isu"):
        return []
    found = {int(m.group(1)) for n in run.fs.listdir("synthesis/isu") if (m := _ISU.match(n))}
    return sorted(b for b in found if has_state(run.fs, syn_isu(b)))


def _prune_isu(run: Run, keep: int) -> None:
    """ISU states of batches before `keep`: resume needs only the newest (a repair that redoes
    an earlier batch rebuilds its statistics from the stored images, `_running_after`)."""
    for b in _isu_batches(run):
        if b < keep:
            remove_state(run.fs, syn_isu(b))


def _running_after(
    run: Run,
    b: int,
    teachers: list[MeasuredTeacher],
    channels: list[list[int]],
    world: World | None,
) -> RunningStats:
    """The ISU statistics after batch b, on the run's device (where the loss mixes them with
    the batch's statistics). Read from `isu/after_batch_b`; where that state is gone (a repair
    redoing batches after an older one, whose state was pruned), rebuilt exactly as synthesis
    built it: Alg. 3's update replayed on each committed batch's stored images, one batch in
    memory at a time, from the newest state before b (or from zero)."""
    device = run.config.device
    running, first = RunningStats.zeros(channels, device), 0
    for a in reversed([a for a in _isu_batches(run) if 0 < a <= b]):
        # A damaged state is removed with a warning and rebuilt like a pruned one.
        if (got := resume_state(run.fs, syn_isu(a), log.warning)) is not None:
            running, first = _as_running(run, got[0]), a
            break
    if first == b:
        return running
    scfg, bsz = recipe(run).synthesis, run.config.synthesis.batch_size
    for a in range(first + 1, b + 1):
        record = read_batch_record(run.fs, a)
        rows = read_image_rows(
            run.fs, SYN_IMAGES, record["start"], record["start"] + record["count"]
        )
        labels = distilled_classes(recipe(run).num_classes, run.config.synthesis.ipc)
        labels = labels[(a - 1) * bsz : (a - 1) * bsz + record["count"]]
        mine = rows if world is None else rows[world.rows(len(rows))]
        x = mine.to(device, scfg.torch_dtype)
        state = SynthesisState(
            a, scfg.iterations, x, labels, x, x, torch.zeros(0, dtype=torch.uint8)
        )
        running = finish_batch(state, teachers, running, scfg, world)
    return running


def _verify_batch(run: Run, b: int, images: torch.Tensor | None = None) -> dict:
    """Batch b's stored rows (or `images`) against its commit record; the record."""
    record = read_batch_record(run.fs, b)
    start, stop = record["start"], record["start"] + record["count"]
    if images is None:
        images = read_image_rows(run.fs, SYN_IMAGES, start, stop)
    if images_sha256(images) != record["images_sha256"]:
        raise CorruptArtifact(
            f"{run.fs.url(SYN_IMAGES)}: images of batch {b} (rows {start}..{stop}) do not "
            "match their commit record; the chunk was damaged after it was written; "
            + REMEDY.format(root=run.fs.url())
        )
    return record


def _init_images(run: Run, train, pools: ClassRows, labels: torch.Tensor, b: int):
    """Real-image initialisation: a seeded draw of training images of the batch's classes
    (the class pools come from the dataset index: no scan of the training set per batch)."""
    if run.config.synthesis.init != "real":
        return None
    g = torch.Generator().manual_seed(derive_seed(run.config.seed, b, 201))
    picks = []
    for c in labels.tolist():
        pool = pools.of(c)
        picks.append(int(pool[torch.randint(len(pool), (1,), generator=g)]))
    return torch.stack([train[i][0] for i in picks])


def _barrier(world: World | None) -> None:
    if world is not None:
        world.barrier()


KL_WORK_COPIES = 6  # C x C float64 per measured layer alive in Eq. 1's forward and backward
CROP_DRAW_BYTES = 17  # one recorded crop draw (4 int32 box + flip), kept for an interval


def synthesis_working_set(w: Work) -> dict[str, Phase]:
    """One batch's iteration: the M teachers and their targets, the ISU statistics, the batch's
    state with its interval-start copy, one teacher's forward and backward, Eq. 1's matrices,
    the interval's crop draws; the checkpoint's copies on the host."""
    cfg, f = w.cfg, w.teacher
    wide = 2 if cfg.synthesis_cfg().dtype == "float64" else 1
    b = cfg.synthesis.batch_size
    img = w.chw * F32 * wide
    m = cfg.teachers.count
    sq = sum(c * c for c in f.channels) * F64
    lin = sum(f.channels) * F64
    ckpt = 3 * b * img
    device = {
        "M x teacher weights": m * f.weight_bytes * wide,
        "targets (M x layers: mean, cov, chol, stacked chol)": m * (2 * lin + 3 * sq),
        "ISU running stats (before + after a batch)": 2 * m * (lin + sq),
        "state + interval-start copy (6 x batch images)": 2 * ckpt,
        "gradient + crops (2 x batch images)": 2 * b * img,
        "batch x saved activations (one teacher)": b * f.saved_input * wide,
        "backward buffers": b * w.backward["synthesis"] * f.largest_activation * wide,
        "Eq. 1 working set (one teacher)": KL_WORK_COPIES * sq,
        "crop draws of an interval": b * cfg.synthesis.checkpoint_every * CROP_DRAW_BYTES,
    }
    host = {
        "checkpoint snapshot + clone + blob": 3 * ckpt,
        "ISU state write (2 copies)": 2 * m * (lin + sq),
        "per-image classes (int64)": w.n * 8,
    }
    return {"iterate": phase(host, device)}


def synthesize(run: Run, progress: Progress = no_progress, world: World | None = None) -> str:
    """Synthesise the distilled set; with `world`, as one rank of a data-parallel group.

    Memory: the teachers, their targets, one batch's state (images + Adam moments) and the ISU
    statistics; never the image set (committed batches are not read again, except one batch at
    a time to check those an earlier process committed, at the end)."""
    cfg, p = run.config, recipe(run)
    writer = world is None or world.is_writer
    scfg = p.synthesis
    if run.manifest.is_recorded(SYN_IMAGES):
        run.manifest.verify(SYN_IMAGES)
        return run.fs.url(SYN_IMAGES)
    if world is None and cfg.distributed.ranks > 1 and run.lock is not None:
        # A torchrun job on this machine; its ranks attach to the run this process has locked.
        return launch(run.fs.url(), cfg, log.info)
    enable_cudnn_autotune(cfg.device)
    models = load_teachers(run)
    train, _, fingerprint = data_splits(run)  # from the dataset index: no listing of the source
    teachers = []
    for m, model in enumerate(models):
        layers, targets = load_targets(run, m, scfg.ridge, fingerprint)
        teachers.append(MeasuredTeacher(model, layers, targets))
    channels = [t.channels for t in teachers]
    classes = distilled_classes(p.num_classes, cfg.synthesis.ipc)
    bsz = cfg.synthesis.batch_size
    shape = (p.in_chans, p.image_size, p.image_size)
    if writer:
        create_images(
            run.fs,
            SYN_IMAGES,
            len(classes),
            shape,
            bsz,
            classes,
            {"mean": list(p.mean), "std": list(p.std), "space": "normalised"},
        )
    _barrier(world)  # the readers open images.zarr once rank 0 has created it
    n_batches = -(-len(classes) // bsz)
    k = scfg.iterations
    pools = class_rows(run, train) if cfg.synthesis.init == "real" else None
    # Batches committed before this process started: checked against their records at the
    # end, one at a time (a resume after 500 batches starts iterating at once).
    earlier: list[int] = []
    # Checkpoints are written on a thread while the next iterations run; it is waited for
    # before a batch is committed. A crash leaves the last checkpoint complete or the one
    # before it (save_state's marker is written last), and the thread is not a daemon: an
    # exception here still lets the write in flight finish.
    saver = BackgroundSaver(run.fs)
    running: RunningStats | None = None  # the ISU statistics after the previous batch
    for b in range(1, n_batches + 1):
        start = (b - 1) * bsz
        labels = classes[start : start + bsz]
        if run.fs.exists(syn_commit(b)):
            earlier.append(b)
            running = None
            continue
        if running is None:
            running = _running_after(run, b - 1, teachers, channels, world)
        state = None
        curve: list[float] = []  # loss at every iteration of this batch (the report's curve)
        ridges = RidgeLog.start(scfg, teachers)  # the ridges Eq. 1 needed (commit record)
        if has_state(run.fs, SYN_CHECKPOINT) and _checkpoint_batch(run) == b:
            resumed = resume_state(run.fs, SYN_CHECKPOINT, log.warning)
            if resumed is not None:
                saved, saved_meta = resumed
                state = SynthesisState.from_tensors(saved, cfg.device, scfg.torch_dtype)
                if world is not None:
                    state = shard_state(state, world)
                curve = list(saved_meta.get("losses", []))[: state.iteration]
                if "ridge" in saved_meta:  # the iterations before the checkpoint
                    ridges = RidgeLog.from_dict(saved_meta["ridge"])
        resumed_from = state.iteration if state is not None else None
        if state is None:
            state = init_state(
                b,
                labels,
                shape,
                derive_seed(cfg.seed, b, 200),
                _init_images(run, train, pools, labels, b) if pools is not None else None,
                cfg.device,
                world,
                scfg.torch_dtype,
            )
        progress(  # the batch's start (or resumed iteration), in the stage's unit
            "synthesis",
            (b - 1 + state.iteration / k) / n_batches,
            {"batch": Count(b, n_batches), "iteration": Count(state.iteration, k)},
        )
        history = []
        last_save = time.monotonic()
        while state.iteration < k:
            until = min(k, state.iteration + cfg.synthesis.checkpoint_every)
            state, hist = run_iterations(state, teachers, running, scfg, until, world)
            history += hist
            ridges.add(hist, teachers)  # no sync: escalations are host values already
            curve += torch.stack([h.loss for h in hist]).tolist()  # one sync per interval
            due = until < k and time.monotonic() - last_save >= cfg.synthesis.checkpoint_seconds
            if world is not None:
                due = world.agree(due)  # gather_state is collective: rank 0's clock decides
            if due:
                whole = state if world is None else gather_state(state, world)
                if whole is not None:
                    meta = {
                        "batch": b,
                        "iteration": whole.iteration,
                        "losses": list(curve),
                        "ridge": ridges.as_dict(),
                    }
                    saver.save(SYN_CHECKPOINT, whole.tensors(), meta)
                last_save = time.monotonic()
            progress(
                "synthesis",
                (b - 1 + state.iteration / k) / n_batches,
                {
                    "batch": Count(b, n_batches),
                    "iteration": Count(state.iteration, k),
                    "loss": curve[-1],
                },
            )
        running = finish_batch(state, teachers, running, scfg, world)
        whole = state if world is None else gather_state(state, world)
        if whole is None:  # a reader rank: wait until rank 0 has written this batch
            _barrier(world)
            continue
        images = whole.images
        saver.wait()
        write_image_batch(run.fs, SYN_IMAGES, start, images)
        _save_running(run, b, running)
        last = history[-1] if history else None
        record = {
            "batch": b,
            "start": start,
            "count": len(labels),
            "iterations": k,
            "teacher": last.teacher if last else None,
            "final_loss": float(last.loss) if last else None,
            "layer_kl": [float(v) for v in last.layer_losses] if last else None,
            "images_sha256": images_sha256(images),
            "resumed_from_iteration": resumed_from,
            "loss_curve": curve,
            "ridge": ridges.as_dict(),
        }
        write_batch_record(run.fs, b, record)
        _prune_isu(run, b)  # after the commit: a crash before it still finds batch b-1's state
        _barrier(world)
    if not writer:
        _barrier(world)  # returns once rank 0 has recorded the images
        return run.fs.url(SYN_IMAGES)
    saver.wait()
    remove_state(run.fs, SYN_CHECKPOINT)
    for b in earlier:  # one batch's rows in memory at a time
        _verify_batch(run, b)
    export_png(run, classes)
    run.manifest.record(SYN_IMAGES, "synthesis")
    # A finished set keeps no ISU state: all it held is in the images (a repair that redoes a
    # batch rebuilds the statistics before it from them), and nothing else reads it.
    _prune_isu(run, n_batches + 1)
    _barrier(world)
    return run.fs.url(SYN_IMAGES)


GRID_CLASSES = 10  # classes shown in the grid (the first, the last and a spread between)
GRID_IMAGES = 10  # images per class shown
GRID_TILE = 96  # largest tile side in pixels (bigger images are downscaled for the grid)


def grid_rows(num_classes: int, ipc: int) -> tuple[list[int], list[int]]:
    """(classes shown, rows of images.zarr shown, class-major): at most GRID_CLASSES classes
    evenly spread from the first to the last, their first min(ipc, GRID_IMAGES) images (image j
    of class c is row j * num_classes + c, `distilled_classes`)."""
    shown = min(num_classes, GRID_CLASSES)
    picked = sorted({round(i * (num_classes - 1) / max(1, shown - 1)) for i in range(shown)})
    rows = [j * num_classes + c for c in picked for j in range(min(ipc, GRID_IMAGES))]
    return picked, rows


def export_png(run: Run, classes: torch.Tensor | None = None) -> None:
    """synthesis/png/grid.png: a bounded sample, one row per shown class (`grid_rows`), images
    in pixel space; its size does not grow with the set (the whole set is in images.zarr).
    Reads only the shown rows."""
    p, ipc = recipe(run), run.config.synthesis.ipc
    picked, rows = grid_rows(p.num_classes, ipc)
    images = ImageRows(run.fs, SYN_IMAGES).__getitems__(rows)
    mean = torch.tensor(p.mean).view(1, -1, 1, 1)
    std = torch.tensor(p.std).view(1, -1, 1, 1)
    pix = (images * std + mean).clamp(0, 1)
    if pix.shape[-1] > GRID_TILE:
        pix = torch.nn.functional.interpolate(
            pix, size=(GRID_TILE, GRID_TILE), mode="bilinear", antialias=True
        ).clamp(0, 1)
    with run.fs.atomic_local_path("synthesis/png/grid.png") as tmp:
        torchvision.utils.save_image(pix, tmp, nrow=min(ipc, GRID_IMAGES), format="png")
    meta = {"classes": picked, "rows": rows, "images_per_class": min(ipc, GRID_IMAGES)}
    write_grid_meta(run.fs, meta)
