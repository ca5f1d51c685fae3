"""Stage 5: students trained by knowledge distillation on the stored labels (Alg. 4, App. D.7),
top-1 on held-out real data, mean +- std over students. Each student checkpoints every
`checkpoint_every_epochs` epochs."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from d3s_core.labelling import derive_seed
from d3s_core.optim import make_optimizer, make_scheduler
from d3s_core.precision import enable_cudnn_autotune
from d3s_core.students import epoch_schedule, train_student_batches
from storage.arrays import image_count, row_batches
from storage.labels import epoch_image_batches, read_epoch_batches
from storage.records import read_student_metrics, write_student_metrics, write_summary
from storage.run import Run, images_of, labels_epoch, student_dir, summary_of
from storage.states import has_state, load_state, remove_state, save_state, weights_blob

from ..terminal import Count
from .common import Progress, data_splits, held_out_top1, new_model, no_progress
from .profile import recipe


@dataclass
class StudentPlan:
    arch: str
    epochs: int
    seed: int


def _plans(run: Run) -> list[StudentPlan]:
    cfg, p = run.config, recipe(run)
    arch = cfg.student_arch()
    epochs = cfg.validation.epochs or p.student.epochs
    return [StudentPlan(arch, epochs, s) for s in range(cfg.validation.students)]


def _student_epoch(
    run: Run,
    student: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler | None,
    temperature: float,
    e: int,
    prefix: str,
) -> float:
    """One student epoch on label epoch e: its label batches, one row group at a time, with
    the image rows of each (read ahead by `stats.workers` DataLoader processes). Memory: one
    label batch of logits and a few batches of images, never the set or the epoch."""
    cfg, rel = run.config, labels_epoch(e, prefix)
    images = row_batches(
        run.fs, images_of(prefix), epoch_image_batches(run.fs, rel), cfg.device, cfg.stats.workers
    )
    batches = zip(images, read_epoch_batches(run.fs, rel, e), strict=True)
    return train_student_batches(student, opt, batches, temperature, sched)


def _train_one(run: Run, plan: StudentPlan, n: int, held, progress: Progress, prefix: str) -> float:
    """One student on the n distilled images; the label epochs were verified by `validate`."""
    cfg, p = run.config, recipe(run)
    sc = p.student
    label_epochs = cfg.labels.epochs
    d = student_dir(plan.arch, plan.seed, prefix)
    torch.manual_seed(derive_seed(cfg.seed, plan.seed, 300))
    student = new_model(p, plan.arch).to(cfg.device)
    steps_per_epoch = -(-n // cfg.labels.batch_size)
    opt = make_optimizer(
        student.parameters(),
        sc.optimizer,
        sc.lr,
        sc.weight_decay,  # type: ignore[arg-type]
        sc.momentum,
    )
    sched = make_scheduler(opt, sc.schedule, steps_per_epoch * plan.epochs)  # type: ignore[arg-type]
    order = epoch_schedule(
        label_epochs,
        plan.epochs,
        torch.Generator().manual_seed(derive_seed(cfg.seed, plan.seed, 301)),
    )
    done = 0
    losses: list[float] = []  # mean KD loss per epoch (the report's curve)
    if has_state(run.fs, f"{d}/checkpoint"):
        state, saved = load_state(run.fs, f"{d}/checkpoint")
        student.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict({**state["scheduler"], "lr_lambdas": [None]})
        torch.set_rng_state(state["torch_rng"])
        done = state["epochs_done"]
        losses = list(saved.get("losses", []))[:done]
    students = run.config.validation.students
    progress(  # the student's start (or resumed epoch), in the stage's unit
        "validation",
        (plan.seed + done / plan.epochs) / students,
        {"student": Count(plan.seed + 1, students), "epoch": Count(done, plan.epochs)},
    )
    for i in range(done, plan.epochs):
        loss = _student_epoch(run, student, opt, sched, sc.temperature, order[i], prefix)
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
            "validation",
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
        "epochs": plan.epochs,
        "label_epochs": label_epochs,
        "top1": acc,
        "test_images": len(held),
        "train_loss": losses,
    }
    write_student_metrics(run.fs, plan.arch, plan.seed, metrics, prefix)
    run.manifest.record(f"{d}/weights.safetensors", "validation")
    run.manifest.record(f"{d}/metrics.json", "validation")
    remove_state(run.fs, f"{d}/checkpoint")
    return acc


def validate(run: Run, progress: Progress = no_progress, prefix: str = "") -> str:
    """Students on the distilled set (prefix "") or on another labelled image set."""
    cfg = run.config
    summary_rel = summary_of(prefix)
    if run.manifest.is_recorded(summary_rel):
        run.manifest.verify(summary_rel)
        return run.fs.url(summary_rel)
    run.manifest.verify(images_of(prefix))
    n = image_count(run.fs, images_of(prefix))
    enable_cudnn_autotune(cfg.device)
    _, held, _ = data_splits(run)

    accs = []
    labels_verified = False
    for plan in _plans(run):
        d = student_dir(plan.arch, plan.seed, prefix)
        if run.manifest.is_recorded(f"{d}/metrics.json"):
            run.manifest.verify(f"{d}/metrics.json")
            accs.append(read_student_metrics(run.fs, plan.arch, plan.seed, prefix)["top1"])
            continue
        if not labels_verified:  # once per stage run, not per student (E files, each whole)
            for e in range(cfg.labels.epochs):
                run.manifest.verify(labels_epoch(e, prefix))
            labels_verified = True
        accs.append(_train_one(run, plan, n, held, progress, prefix))
    summary = {
        "students": len(accs),
        "top1": accs,
        "mean": statistics.mean(accs),
        "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "distilled_images": n,
    }
    write_summary(run.fs, summary, prefix)
    run.manifest.record(summary_rel, "validation")
    return run.fs.url(summary_rel)
