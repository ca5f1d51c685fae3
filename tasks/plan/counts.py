"""Counts of every stage's units of work (docs/plan.md, "Counts")."""

from __future__ import annotations

from typing import Any

from storage.config import RunConfig

from .data import planned_recipe
from .units import ceil_div


def counts(cfg: RunConfig, n_train: int) -> dict[str, dict[str, Any]]:
    p, t, s = planned_recipe(cfg), cfg.teacher_train(n_train), cfg.stats
    m, n = cfg.teachers.count, p.num_classes * cfg.synthesis.ipc
    trained = not cfg.teachers.import_from
    stats_batches = ceil_div(n_train, s.batch_size)
    k, syn_b = cfg.synthesis_cfg().iterations, cfg.synthesis.batch_size
    lb = cfg.labels.batch_size
    labels = {
        "epochs": cfg.labels.epochs,
        "batches_per_epoch": ceil_div(n, lb),
        "images": n,
        "labellers": m if cfg.labels.teachers == "ensemble" else 1,
    }
    students = {
        "students": cfg.validation.students,
        "arch": cfg.student_arch(),
        "epochs": cfg.validation.epochs or p.student.epochs,
        "steps_per_epoch": ceil_div(n, lb),
        "images": n,
    }
    out: dict[str, dict[str, Any]] = {
        "teachers": {
            "teachers": m,
            "trained": trained,
            "epochs": t.epochs if trained else 0,
            "steps_per_epoch": ceil_div(n_train, t.batch_size) if trained else 0,
            "train_images": n_train,
        },
        "stats": {
            "images": n_train,
            "batches": stats_batches,
            "shards": ceil_div(stats_batches, s.checkpoint_batches),
            "teachers": m,
        },
        "synthesis": {
            "images": n,
            "batches": ceil_div(n, syn_b),
            "iterations_per_batch": k,
            "iterations": ceil_div(n, syn_b) * k,
            "intervals_per_batch": ceil_div(k, cfg.synthesis.checkpoint_every),
        },
    }
    v = cfg.validation
    soft, hard = "soft" in v.protocols, "hard" in v.protocols
    if soft:  # the flow labels and validates under the soft protocol only when it is listed
        out["labels"] = labels
        out["validation"] = students
    if hard:  # the same students on the class labels: no labels
        out["validation_hard"] = dict(students)
    if v.random_real_baseline:
        if soft:
            out["baseline_labels"] = dict(labels)
            out["baseline_validation"] = dict(students)
        if hard:
            out["baseline_validation_hard"] = dict(students)
    if v.coresets:
        sets = len(v.coresets)
        out["coresets"] = {
            "methods": list(v.coresets),
            "teacher": v.coreset_teacher,
            "images": n_train,  # one forward of the coreset teacher per training image
            "set_images": n,
            "sets": sets,
        }
        if soft:
            out["coreset_labels"] = {**labels, "sets": sets}
            out["coreset_validation"] = {**students, "sets": sets}
        if hard:
            out["coreset_validation_hard"] = {**students, "sets": sets}
    if v.full_data:
        out["full_data"] = {
            "students": v.full_data_students,
            "arch": cfg.student_arch(),
            "epochs": v.full_data_epochs or t.epochs,  # tasks/stages/validation.py `_plans`
            "steps_per_epoch": ceil_div(n_train, lb),
            "images": n_train,
        }
    return out
