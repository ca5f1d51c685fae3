"""Stage 1: train M teachers (Table 8), checkpointing every few epochs, or import them from
existing checkpoint files."""

from __future__ import annotations

import logging
from dataclasses import asdict

import torch

from d3s_core.labelling import derive_seed
from d3s_core.precision import enable_cudnn_autotune
from d3s_core.teachers import TeacherState, TeacherTrainer
from storage.checkpoints import load_into, read_state_dict
from storage.records import read_teacher_metas
from storage.run import Run, teacher_checkpoint, teacher_weights
from storage.states import remove_state, resume_state, save_state

from ..terminal import Count
from .common import (
    Progress,
    batches,
    data_splits,
    held_out_top1,
    new_model,
    no_progress,
    save_teacher,
)
from .recipe import recipe, teacher_recipe, teacher_warnings
from .working_set import F32, Phase, Work, phase

log = logging.getLogger("d3s")  # the Prefect task forwards it to the run's log


def teachers_working_set(w: Work) -> dict[str, Phase]:
    """One teacher in training (they train one after another): weights, grads, optimiser state,
    a batch with its saved activations; the checkpoint's copies on the host."""
    t, f = w.cfg.teacher_train(), w.teacher
    opt = w.optimizer_slots(t.optimizer, t.momentum) * f.params * F32
    device = {
        "weights + grads": f.weight_bytes + f.params * F32,
        "optimiser state": opt,
        "batch x (image + saved activations)": t.batch_size * (w.chw * F32 + f.saved_train),
        "backward buffers": t.batch_size * w.backward["train"] * f.largest_activation,
    }
    host = {**w.loader(t.batch_size), "checkpoint write (2 copies)": 2 * (f.weight_bytes + opt)}
    return {"train": phase(host, device)}


def train_teachers(run: Run, progress: Progress = no_progress) -> list[str]:
    cfg, p, tcfg = run.config, recipe(run), teacher_recipe(run)
    train, held, fingerprint = data_splits(run)
    steps = -(-len(train) // tcfg.batch_size)  # type: ignore[arg-type]
    count = cfg.teachers.count
    enable_cudnn_autotune(cfg.device)
    for m in range(count):
        if run.manifest.is_recorded(teacher_weights(m)):
            run.manifest.verify(teacher_weights(m))
            continue
        torch.manual_seed(derive_seed(cfg.seed, m, 100))
        model = new_model(p)
        meta = {
            "arch": p.arch,
            "num_classes": p.num_classes,
            "in_chans": p.in_chans,
            "low_res": p.low_res,
            "width": p.width,
            "image_size": p.image_size,
            "mean": list(p.mean),
            "std": list(p.std),
            "preset": p.name,
            "dataset_fingerprint": fingerprint,
        }
        if cfg.teachers.import_from:
            url = cfg.teachers.import_from[m]
            progress("teachers", m / count, {"teacher": Count(m + 1, count), "importing": url})
            load_into(model, read_state_dict(url), url)
            model = model.to(cfg.device)
            meta |= {"source": "imported", "imported_from": url, "epochs": None}
        else:
            if cfg.teachers.init_from:
                url = cfg.teachers.init_from[m]
                reset = load_into(model, read_state_dict(url), url, allow_new_head=True)
                meta |= {"initialised_from": url, "reinitialised": reset}
            model, losses = _train(run, m, model.to(cfg.device), train, steps, progress)
            meta |= {"source": "trained", "epochs": tcfg.epochs, "train_loss": losses}
        meta["held_out_top1"] = held_out_top1(run, model, held)
        save_teacher(run, m, model, meta)
        remove_state(run.fs, teacher_checkpoint(m))
    for w in teacher_warnings(read_teacher_metas(run.fs, count), p.num_classes):
        log.warning("recipe: %s", w)
    return [run.fs.url(teacher_weights(m)) for m in range(count)]


def _train(run: Run, m: int, model: torch.nn.Module, train, steps: int, progress: Progress):
    cfg, tcfg = run.config, teacher_recipe(run)
    trainer = TeacherTrainer(model, tcfg, steps, seed=derive_seed(cfg.seed, m, 101))
    ckpt = teacher_checkpoint(m)
    losses: list[float] = []  # mean training loss per epoch (the report's curve)
    if (resumed := resume_state(run.fs, ckpt, log.warning)) is not None:
        state, saved = resumed
        trainer.load(TeacherState(**state))
        losses = list(saved.get("losses", []))[: trainer.epoch]
    count = cfg.teachers.count
    progress(  # the teacher's start (or resumed epoch), in the stage's unit
        "teachers",
        (m + trainer.epoch / tcfg.epochs) / count,
        {"teacher": Count(m + 1, count), "epoch": Count(trainer.epoch, tcfg.epochs)},
    )
    while trainer.epoch < tcfg.epochs:
        order = torch.Generator().manual_seed(derive_seed(cfg.seed, m, trainer.epoch, 102))
        loss = trainer.train_epoch(batches(run, train, tcfg.batch_size, order))
        losses.append(float(loss))
        if trainer.epoch % cfg.teachers.checkpoint_every_epochs == 0:
            save_state(
                run.fs,
                ckpt,
                asdict(trainer.state()),
                {"teacher": m, "losses": losses, "epoch": trainer.epoch},
            )
        progress(
            "teachers",
            (m + trainer.epoch / tcfg.epochs) / count,
            {
                "teacher": Count(m + 1, count),
                "epoch": Count(trainer.epoch, tcfg.epochs),
                "loss": float(loss),
            },
        )
    return trainer.model, losses
