"""Stage 5: students trained on an image set, top-1 on held-out real data, mean +- std over
students, under one of two protocols (docs/study.md, "Scores"):

- soft (the paper's, Alg. 4, App. D.7): knowledge distillation on the stored ensemble labels,
  each step replaying its label batch's recorded crops and flips;
- hard (DD-Ranking's hard-label setting): the same students, optimiser, schedule, epochs and
  batch size, trained with cross-entropy on the images' class labels, under the same
  random-resized-crop and flip drawn afresh each epoch (seeded). Needs no labels, so it also
  trains the full-data reference (`FULL_DATA`: every training image, streamed).

Each student checkpoints every `checkpoint_every_epochs` epochs."""

from __future__ import annotations

import logging
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from d3s_core.labelling import derive_seed
from d3s_core.optim import make_optimizer, make_scheduler
from d3s_core.precision import enable_cudnn_autotune
from d3s_core.students import epoch_schedule, train_hard_batches, train_student_batches
from storage.arrays import image_count, read_classes, row_batches
from storage.labels import epoch_image_batches, read_epoch_batches
from storage.records import read_student_metrics, write_student_metrics, write_summary
from storage.run import FULL_DATA, Run, images_of, labels_epoch, student_dir, summary_of
from storage.states import remove_state, resume_state, save_state, weights_blob

from ..terminal import Count
from .common import (
    Progress,
    batches,
    data_splits,
    held_out_top1,
    load_teachers,
    new_model,
    no_progress,
    trimmed,
)
from .labels import online_epoch
from .recipe import recipe, teacher_recipe
from .working_set import EPOCH_INDEX_BYTES, F32, Phase, Work, phase

log = logging.getLogger("d3s")  # the Prefect task forwards it to the run's log


@dataclass
class StudentPlan:
    arch: str
    epochs: int
    seed: int


def _plans(run: Run, prefix: str = "") -> list[StudentPlan]:
    """The students of an image set: `validation.students` of the student recipe's epochs;
    the full-data reference: `validation.full_data_students` of `full_data_epochs` (default:
    the teachers' recipe's epochs, which is what it was tuned to train on the full set)."""
    cfg, p = run.config, recipe(run)
    arch, v = cfg.student_arch(), cfg.validation
    if prefix == FULL_DATA:
        epochs = v.full_data_epochs or teacher_recipe(run).epochs
        return [StudentPlan(arch, epochs, s) for s in range(v.full_data_students)]
    epochs = v.epochs or p.student.epochs
    return [StudentPlan(arch, epochs, s) for s in range(v.students)]


def _hard_epoch(
    run: Run,
    student: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler | None,
    seed: int,
    e: int,
    prefix: str,
    train=None,
) -> float:
    """One hard-protocol epoch: a seeded shuffle of the set (the full-data reference: of the
    training set, through the run's DataLoader path) in batches of `labels.batch_size`, the
    soft protocol's batch size, each augmented and fitted by cross-entropy. Memory: a few
    batches of images, never the set."""
    cfg, lc = run.config, run.config.label_cfg()
    order = torch.Generator().manual_seed(derive_seed(cfg.seed, seed, e, 310))
    crops = torch.Generator().manual_seed(derive_seed(cfg.seed, seed, e, 311))
    bsz = lc.batch_size
    data: Iterator[tuple[torch.Tensor, torch.Tensor]]
    if prefix == FULL_DATA:
        data = batches(run, train, bsz, order)
    else:
        rel = images_of(prefix)
        classes = read_classes(run.fs, rel)  # 8 bytes an image
        rows = torch.randperm(len(classes), generator=order).split(bsz)
        images = row_batches(run.fs, rel, (r.tolist() for r in rows), cfg.device, cfg.stats.workers)
        data = zip(images, (classes[r] for r in rows), strict=True)
    # The heap is trimmed when the batches' churn piles up in it (common.trimmed).
    data = trimmed(data)
    return train_hard_batches(student, opt, data, crops, lc.min_crop_scale, lc.flip, sched)


def _student_epoch(
    run: Run,
    student: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler | None,
    temperature: float,
    e: int,
    prefix: str,
    teachers: list[torch.nn.Module] | None = None,
) -> float:
    """One student epoch on label epoch e: its label batches, one row group at a time, with
    the image rows of each (read ahead by `stats.workers` DataLoader processes); with
    `teachers` (`labels.format: online`) the same batches labelled now. Memory: one label batch
    of logits and a few batches of images (online: and the M teachers), never the epoch."""
    cfg, rel = run.config, labels_epoch(e, prefix)
    if teachers is not None:
        pairs: Iterator[tuple[torch.Tensor, Any]] = online_epoch(run, teachers, e, prefix)
    else:
        images = row_batches(
            run.fs,
            images_of(prefix),
            epoch_image_batches(run.fs, rel),
            cfg.device,
            cfg.stats.workers,
        )
        pairs = zip(images, read_epoch_batches(run.fs, rel, e), strict=True)
    # The heap is trimmed when the batches' churn (at ImageNet-21K shape an 8 MiB label batch
    # each) piles up in it (common.trimmed).
    return train_student_batches(student, opt, trimmed(pairs), temperature, sched)


def _train_one(
    run: Run,
    plan: StudentPlan,
    n: int,
    held,
    progress: Progress,
    prefix: str,
    protocol: str = "soft",
    train=None,
    teachers: list[torch.nn.Module] | None = None,
) -> float:
    """One student on the n images of the set under `protocol`; the label epochs (soft) were
    verified by `validate` (or, online, its `teachers` label each batch). The same seed gives
    the same initial weights under both protocols."""
    cfg, p = run.config, recipe(run)
    sc = p.student
    label_epochs = cfg.labels.epochs
    d = student_dir(plan.arch, plan.seed, prefix, protocol)
    torch.manual_seed(derive_seed(cfg.seed, plan.seed, 300))
    student = new_model(p, plan.arch).to(cfg.device)
    steps_per_epoch = -(-n // cfg.labels.batch_size)
    opt = make_optimizer(student.parameters(), sc.optimizer, sc.lr, sc.weight_decay, sc.momentum)
    sched = make_scheduler(opt, sc.schedule, steps_per_epoch * plan.epochs)
    order = epoch_schedule(
        label_epochs,
        plan.epochs,
        torch.Generator().manual_seed(derive_seed(cfg.seed, plan.seed, 301)),
    )
    done = 0
    losses: list[float] = []  # mean KD (soft) or CE (hard) loss per epoch (the report's curve)
    if (resumed := resume_state(run.fs, f"{d}/checkpoint", log.warning)) is not None:
        state, saved = resumed
        student.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict({**state["scheduler"], "lr_lambdas": [None]})
        torch.set_rng_state(state["torch_rng"])
        done = state["epochs_done"]
        losses = list(saved.get("losses", []))[:done]
    students = len(_plans(run, prefix))
    stage = "validation" if protocol == "soft" else "validation-hard"  # the card it moves
    progress(  # the student's start (or resumed epoch), in the stage's unit
        stage,
        (plan.seed + done / plan.epochs) / students,
        {"student": Count(plan.seed + 1, students), "epoch": Count(done, plan.epochs)},
    )
    for i in range(done, plan.epochs):
        if protocol == "hard":
            loss = _hard_epoch(run, student, opt, sched, plan.seed, i, prefix, train)
        else:
            loss = _student_epoch(
                run, student, opt, sched, sc.temperature, order[i], prefix, teachers
            )
        losses.append(float(loss))
        if (i + 1) % cfg.validation.checkpoint_every_epochs == 0 and i + 1 < plan.epochs:
            save_state(
                run.fs,
                f"{d}/checkpoint",
                {
                    "model": student.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"},
                    "torch_rng": torch.get_rng_state(),
                    "epochs_done": i + 1,
                },
                {"losses": losses, "epoch": i + 1},
            )
        progress(
            stage,
            (plan.seed + (i + 1) / plan.epochs) / students,
            {
                "student": Count(plan.seed + 1, students),
                "epoch": Count(i + 1, plan.epochs),
                "loss": float(loss),
            },
        )
    acc = held_out_top1(run, student, held)
    run.fs.write_bytes(f"{d}/weights.safetensors", weights_blob(student.state_dict()))
    metrics = {
        "arch": plan.arch,
        "seed": plan.seed,
        "protocol": protocol,
        "epochs": plan.epochs,
        "label_epochs": label_epochs if protocol == "soft" else None,
        "top1": acc,
        "test_images": len(held),
        "train_images": n,
        "train_loss": losses,
    }
    write_student_metrics(run.fs, plan.arch, plan.seed, metrics, prefix, protocol)
    run.manifest.record(f"{d}/weights.safetensors", "validation")
    labels = cfg.labels.format if protocol == "soft" else None  # which labels it learnt from
    run.manifest.record(f"{d}/metrics.json", "validation", labels=labels)
    remove_state(run.fs, f"{d}/checkpoint")
    return acc


EVAL_BATCH = 256  # held_out_top1's batch


def _held_out(w: Work, f: Any) -> Phase:
    """held_out_top1: the student's weights and one evaluation batch through it."""
    held = {
        "weights": f.weight_bytes,
        "held-out batch x (image + forward)": EVAL_BATCH * (w.chw * F32 + f.forward_live),
    }
    return phase(w.loader(EVAL_BATCH), held)


def validation_working_set(w: Work, hard: bool = False) -> dict[str, Phase]:
    """Students on an image set of w.n images, one at a time: a training student (weights,
    grads, optimiser state, a batch of rows with crops) and the logits of the label batch, its
    softmaxes and gradients; `hard`: on the class labels (the student's logits and their
    gradient, no label batch). On the host the prefetched rows, the label batch read back, the
    epoch's index vectors and the checkpoint's copies; then held-out top-1."""
    f, b, k = w.student, w.cfg.labels.batch_size, w.p.num_classes
    device = w.student_train_device("rows")
    host = {"prefetched image rows (workers x 2 + 1)": w.prefetch * b * w.chw * F32}
    if hard:
        device["logits (student + grads)"] = b * k * F32 * 2
    elif w.cfg.labels.format == "online":  # the teachers label each batch on the device
        m, t = w.cfg.teachers.count, w.teacher
        device["M x teacher weights (online labels)"] = m * t.weight_bytes
        device["batch x (crops + a teacher's forward)"] = b * (w.chw * F32 + t.forward_live)
        device["logits (each labeller + mean, student, softmaxes, grads)"] = b * k * F32 * (m + 7)
    else:
        device["logits (labels, student, softmaxes, grads)"] = b * k * F32 * 6
        host["label batch read back"] = b * k * F32 * 3
    host["per-image index vectors"] = w.n * EPOCH_INDEX_BYTES
    host["checkpoint write (2 copies)"] = 2 * (f.weight_bytes + device["optimiser state"])
    return {"train": phase(host, device), "held-out": _held_out(w, f)}


def hard_working_set(w: Work) -> dict[str, Phase]:
    """The hard protocol's students (`validation_working_set`, hard)."""
    return validation_working_set(w, hard=True)


def full_data_working_set(w: Work) -> dict[str, Phase]:
    """Hard-protocol students on the whole training set, streamed through the run's
    DataLoader in batches of labels.batch_size: a training student with the logits and their
    gradient, the epoch's permutation, the checkpoint's copies; then held-out top-1."""
    f, b, k = w.student, w.cfg.labels.batch_size, w.p.num_classes
    device = {
        **w.student_train_device("image"),
        "logits (student + grads)": b * k * F32 * 2,
    }
    host = {
        **w.loader(b),
        "epoch permutation (int64)": w.n_train * 8,
        "checkpoint write (2 copies)": 2 * (f.weight_bytes + device["optimiser state"]),
    }
    return {"train": phase(host, device), "held-out": _held_out(w, f)}


def validate(
    run: Run, progress: Progress = no_progress, prefix: str = "", protocol: str = "soft"
) -> str:
    """Students on the distilled set (prefix ""), on a baseline's image set, or (hard only) on
    the full training set (prefix `FULL_DATA`), under `protocol` ("soft" | "hard")."""
    cfg = run.config
    summary_rel = summary_of(prefix, protocol)
    if run.manifest.is_recorded(summary_rel):
        run.manifest.verify(summary_rel)
        for plan in _plans(run, prefix):  # its students too: a few MB of weights each
            d = student_dir(plan.arch, plan.seed, prefix, protocol)
            for rel in (f"{d}/weights.safetensors", f"{d}/metrics.json"):
                if run.manifest.is_recorded(rel):
                    run.manifest.verify(rel)
        return run.fs.url(summary_rel)
    if protocol not in ("soft", "hard"):
        raise ValueError(f"unknown protocol {protocol!r}; expected 'soft' or 'hard'")
    enable_cudnn_autotune(cfg.device)
    train, held, _ = data_splits(run)
    if prefix == FULL_DATA:
        if protocol != "hard":
            raise ValueError("the full-data reference is validated under the hard protocol only")
        n = len(train)  # type: ignore[arg-type]
    else:
        run.manifest.verify(images_of(prefix))
        n = image_count(run.fs, images_of(prefix))

    accs = []
    labels_verified = protocol == "hard"  # the hard protocol reads no labels
    teachers = None  # online labels: the M teachers, loaded once for every student
    for plan in _plans(run, prefix):
        d = student_dir(plan.arch, plan.seed, prefix, protocol)
        if run.manifest.is_recorded(f"{d}/metrics.json"):
            run.manifest.verify(f"{d}/metrics.json")
            accs.append(
                read_student_metrics(run.fs, plan.arch, plan.seed, prefix, protocol)["top1"]
            )
            continue
        if not labels_verified and cfg.labels.format == "online":
            teachers = load_teachers(run)  # checked against the manifest; on the run's device
            labels_verified = True
        if not labels_verified:  # once per stage run, not per student (E files, each whole)
            for e in range(cfg.labels.epochs):
                run.manifest.verify(labels_epoch(e, prefix))
            labels_verified = True
        accs.append(_train_one(run, plan, n, held, progress, prefix, protocol, train, teachers))
    summary = {
        "protocol": protocol,
        "students": len(accs),
        "top1": accs,
        "mean": statistics.mean(accs),
        "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "distilled_images": n,  # the set's size (the full-data reference: the training set's)
    }
    write_summary(run.fs, summary, prefix, protocol)
    run.manifest.record(summary_rel, "validation")
    return run.fs.url(summary_rel)


def validate_hard(run: Run, progress: Progress = no_progress) -> str:
    """The distilled set under the hard protocol (the `validation-hard` stage)."""
    return validate(run, progress, "", "hard")
