"""Stage 1: train M teachers (Table 8), checkpointing every few epochs."""

from __future__ import annotations

from dataclasses import asdict

import torch

from d3s_core.labelling import derive_seed
from d3s_core.students import evaluate_top1
from d3s_core.teachers import TeacherState, TeacherTrainer
from storage.run import Run, teacher_checkpoint, teacher_weights
from storage.states import has_state, load_state, remove_state, save_state

from .common import Progress, data_splits, new_model, no_progress, save_teacher


def train_teachers(run: Run, progress: Progress = no_progress) -> list[str]:
    cfg, p, tcfg = run.config, run.config.preset_obj(), run.config.teacher_train()
    train, held, fingerprint = data_splits(run)
    x, y = (t.to(cfg.device) for t in train.tensors())
    xh, yh = (t.to(cfg.device) for t in held.tensors())
    steps = -(-len(x) // tcfg.batch_size)
    count = cfg.teachers.count
    for m in range(count):
        if run.manifest.is_recorded(teacher_weights(m)):
            run.manifest.verify(teacher_weights(m))
            continue
        torch.manual_seed(derive_seed(cfg.seed, m, 100))
        trainer = TeacherTrainer(
            new_model(p).to(cfg.device), tcfg, steps, seed=derive_seed(cfg.seed, m, 101)
        )
        ckpt = teacher_checkpoint(m)
        if has_state(run.fs, ckpt):
            state, _ = load_state(run.fs, ckpt)
            trainer.load(TeacherState(**state))
        while trainer.epoch < tcfg.epochs:
            loss = trainer.train_epoch(trainer.shuffled_batches(x, y))
            if trainer.epoch % cfg.teachers.checkpoint_every_epochs == 0:
                save_state(run.fs, ckpt, asdict(trainer.state()), {"teacher": m})
            progress(
                "teachers",
                (m + trainer.epoch / tcfg.epochs) / count,
                {"teacher": m, "epoch": trainer.epoch, "loss": loss},
            )
        acc = evaluate_top1(trainer.model, xh, yh)
        save_teacher(
            run,
            m,
            trainer.model,
            {
                "arch": p.arch,
                "num_classes": p.num_classes,
                "in_chans": p.in_chans,
                "low_res": p.low_res,
                "width": p.width,
                "preset": p.name,
                "epochs": tcfg.epochs,
                "held_out_top1": acc,
                "dataset_fingerprint": fingerprint,
                "source": "trained",
            },
        )
        remove_state(run.fs, ckpt)
    return [run.fs.url(teacher_weights(m)) for m in range(count)]
