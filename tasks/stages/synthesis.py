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

import json

import torch
import torchvision

from d3s_core.distributed import World
from d3s_core.isu import RunningStats
from d3s_core.labelling import derive_seed
from d3s_core.precision import enable_cudnn_autotune
from d3s_core.synthesis import (
    MeasuredTeacher,
    SynthesisState,
    finish_batch,
    gather_state,
    init_state,
    run_iterations,
    shard_state,
)
from storage.arrays import create_images, images_sha256, read_images, write_image_batch
from storage.manifest import CorruptArtifact
from storage.run import SYN_CHECKPOINT, SYN_IMAGES, Run, syn_commit, syn_isu
from storage.states import BackgroundSaver, has_state, load_state, remove_state, save_state

from .common import Progress, class_of_each, data_splits, load_teachers, no_progress
from .stats import load_targets


def distilled_classes(num_classes: int, ipc: int) -> torch.Tensor:
    """Class of each distilled image: every class once, IPC times over, so each synthesis batch
    holds a balanced mix of classes."""
    return torch.arange(num_classes).repeat(ipc)


def _running_after(run: Run, b: int, channels: list[list[int]]) -> RunningStats:
    """The ISU statistics after batch b, on the run's device (where the loss mixes them with
    the batch's statistics)."""
    device = run.config.device
    if b == 0:
        return RunningStats.zeros(channels, device)
    state, _ = load_state(run.fs, syn_isu(b))
    stats = RunningStats(state["means"], state["covs"], state["batches_done"], state["images_done"])
    return stats.to(device)


def _verify_batch(run: Run, b: int, start: int, images: torch.Tensor) -> dict:
    record = json.loads(run.fs.read_bytes(syn_commit(b)))
    if images_sha256(images[start : start + record["count"]]) != record["images_sha256"]:
        raise CorruptArtifact(
            f"{run.fs.url(SYN_IMAGES)}: images of batch {b} "
            f"(rows {start}..{start + record['count']}) do not match their commit record; "
            "the chunk was damaged after it was written"
        )
    return record


def _init_images(run: Run, train, labels: torch.Tensor, b: int) -> torch.Tensor | None:
    """Real-image initialisation: a seeded draw of training images of the batch's classes."""
    if run.config.synthesis.init != "real":
        return None
    y = class_of_each(train)
    g = torch.Generator().manual_seed(derive_seed(run.config.seed, b, 201))
    picks = []
    for c in labels.tolist():
        pool = torch.nonzero(y == c).flatten()
        picks.append(int(pool[torch.randint(len(pool), (1,), generator=g)]))
    return torch.stack([train[i][0] for i in picks])


def _barrier(world: World | None) -> None:
    if world is not None:
        world.barrier()


def synthesize(run: Run, progress: Progress = no_progress, world: World | None = None) -> str:
    """Synthesise the distilled set; with `world`, as one rank of a data-parallel group."""
    cfg, p = run.config, run.config.preset_obj()
    writer = world is None or world.is_writer
    scfg = cfg.synthesis_cfg()
    if run.manifest.is_recorded(SYN_IMAGES):
        run.manifest.verify(SYN_IMAGES)
        return run.fs.url(SYN_IMAGES)
    enable_cudnn_autotune(cfg.device)
    models = load_teachers(run)
    train, _, fingerprint = data_splits(run)  # once: an ImageFolder scan lists every file
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
    stored, _ = read_images(run.fs, SYN_IMAGES)
    batches = list(classes.split(bsz))
    k = scfg.iterations
    # Checkpoints are written on a thread while the next iterations run; it is waited for
    # before a batch is committed. A crash leaves the last checkpoint complete or the one
    # before it (save_state's marker is written last), and the thread is not a daemon: an
    # exception here still lets the write in flight finish.
    saver = BackgroundSaver(run.fs)
    for b, labels in enumerate(batches, start=1):
        start = (b - 1) * bsz
        if run.fs.exists(syn_commit(b)):
            _verify_batch(run, b, start, stored)
            continue
        running = _running_after(run, b - 1, channels)
        state = None
        curve: list[float] = []  # loss at every iteration of this batch (the report's curve)
        if has_state(run.fs, SYN_CHECKPOINT):
            saved, saved_meta = load_state(run.fs, SYN_CHECKPOINT)
            if int(saved["batch_index"]) == b:
                state = SynthesisState.from_tensors(saved, cfg.device, scfg.torch_dtype)
                if world is not None:
                    state = shard_state(state, world)
                curve = list(saved_meta.get("losses", []))[: state.iteration]
        resumed_from = state.iteration if state is not None else None
        if state is None:
            state = init_state(
                b,
                labels,
                shape,
                derive_seed(cfg.seed, b, 200),
                _init_images(run, train, labels, b),
                cfg.device,
                world,
                scfg.torch_dtype,
            )
        history = []
        while state.iteration < k:
            until = min(k, state.iteration + cfg.synthesis.checkpoint_every)
            state, hist = run_iterations(state, teachers, running, scfg, until, world)
            history += hist
            curve += torch.stack([h.loss for h in hist]).tolist()  # one sync per interval
            whole = state if world is None else gather_state(state, world)
            if whole is not None:
                meta = {"batch": b, "iteration": whole.iteration, "losses": list(curve)}
                saver.save(SYN_CHECKPOINT, whole.tensors(), meta)
            progress(
                "synthesis",
                (b - 1 + state.iteration / k) / len(batches),
                {"batch": b, "iteration": state.iteration, "loss": curve[-1]},
            )
        running = finish_batch(state, teachers, running, scfg, world)
        whole = state if world is None else gather_state(state, world)
        if whole is None:  # a reader rank: wait until rank 0 has written this batch
            _barrier(world)
            continue
        images = whole.images
        saver.wait()
        write_image_batch(run.fs, SYN_IMAGES, start, images)
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
        }
        run.fs.write_bytes(syn_commit(b), json.dumps(record, indent=1).encode())
        stored[start : start + len(labels)] = images.cpu()
        _barrier(world)
    if not writer:
        _barrier(world)  # returns once rank 0 has recorded the images
        return run.fs.url(SYN_IMAGES)
    saver.wait()
    remove_state(run.fs, SYN_CHECKPOINT)
    export_png(run, stored, classes)
    run.manifest.record(SYN_IMAGES, "synthesis")
    _barrier(world)
    return run.fs.url(SYN_IMAGES)


def export_png(run: Run, images: torch.Tensor, classes: torch.Tensor) -> None:
    """synthesis/png/grid.png: one row per class, images in pixel space (for looking at)."""
    p = run.config.preset_obj()
    mean = torch.tensor(p.mean).view(1, -1, 1, 1)
    std = torch.tensor(p.std).view(1, -1, 1, 1)
    pix = (images * std + mean).clamp(0, 1)
    order = torch.argsort(classes * len(classes) + torch.arange(len(classes)))
    with run.fs.atomic_local_path("synthesis/png/grid.png") as tmp:
        torchvision.utils.save_image(pix[order], tmp, nrow=run.config.synthesis.ipc, format="png")
