"""Bytes on disk per artifact and the synthesis checkpoints' write volume (docs/plan.md,
"Disk"); label epochs are measured by writing a few batches of random logits."""

from __future__ import annotations

import math
import os
import tempfile
from functools import lru_cache
from typing import Any

from storage.config import RunConfig
from storage.fs import RunFS
from storage.label_sizes import random_epoch
from storage.labels import write_epoch

from .data import planned_recipe
from .model import facts_for
from .units import F32, F64


# -- label bytes ------------------------------------------------------------------------------
def _written_epoch_bytes(rows: int, classes: int, fmt: str, k: int, batch_size: int) -> int:

    with tempfile.TemporaryDirectory() as d:
        fs = RunFS(d)
        write_epoch(fs, "e.parquet", random_epoch(rows, classes, batch_size), fmt, k)  # type: ignore[arg-type]
        return os.path.getsize(fs.path("e.parquet"))


@lru_cache(maxsize=32)
def label_epoch_bytes(
    n: int, classes: int, fmt: str, k: int, batch_size: int, budget: int = 2**21
) -> int:
    """Bytes of one label epoch of n rows, measured as storage/label_sizes.py does (random
    logits written by `write_epoch`, one row group per label batch): written whole when it
    holds at most `budget` logits, else g and 2g whole batches are written and the line
    through the two sizes (bytes per batch + the file's fixed part) is extrapolated to n."""
    per_batch = batch_size * classes
    hi = max(2, budget // per_batch)
    if n <= hi * batch_size:
        return _written_epoch_bytes(n, classes, fmt, k, batch_size)
    lo = hi // 2
    b_lo = _written_epoch_bytes(lo * batch_size, classes, fmt, k, batch_size)
    b_hi = _written_epoch_bytes(hi * batch_size, classes, fmt, k, batch_size)
    slope = (b_hi - b_lo) / ((hi - lo) * batch_size)
    return round(b_hi + slope * (n - hi * batch_size))


# -- disk -------------------------------------------------------------------------------------
def optimizer_slots(name: str, momentum: float = 0.9) -> int:
    """Tensors of parameter size an optimiser keeps: AdamW 2, SGD with momentum 1."""
    return 2 if name == "adamw" else int(momentum > 0)


def stats_bytes(channels: tuple[int, ...]) -> int:
    """One teacher's per-layer mean (C) and covariance (C x C), float64."""
    return sum((c + c * c) * F64 for c in channels)


def _artifact(nbytes: int, formula: str, kept: bool = True, **extra: Any) -> dict[str, Any]:
    return {"bytes": int(nbytes), "kept": kept, "formula": formula, **extra}


def disk(cfg: RunConfig, c: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Bytes per artifact; `kept` False for checkpoints and shards removed when done."""
    p, t = planned_recipe(cfg), cfg.teacher_train()
    tf, sf = facts_for(cfg, p.arch), facts_for(cfg, cfg.student_arch())
    m, n = cfg.teachers.count, c["synthesis"]["images"]
    chw = p.in_chans * p.image_size * p.image_size
    st = stats_bytes(tf.channels)
    f64 = cfg.synthesis_cfg().dtype == "float64"
    ckpt = 3 * cfg.synthesis.batch_size * chw * F32 * (2 if f64 else 1)
    k = cfg.synthesis_cfg().iterations
    fmt = cfg.labels.format
    epoch = (
        0
        if fmt == "online"  # not stored: the teachers label each student batch
        else label_epoch_bytes(n, p.num_classes, fmt, cfg.labels.topk, cfg.labels.batch_size)
    )
    s_slots = optimizer_slots(p.student.optimizer, p.student.momentum)
    out = {
        "teacher_weights": _artifact(m * tf.weight_bytes, "M x state_dict bytes (float32)"),
        "teacher_checkpoint": _artifact(
            tf.weight_bytes + optimizer_slots(t.optimizer, t.momentum) * tf.params * F32,
            "weights + optimiser state (one teacher at a time)",
            kept=False,
        ),
        "stats_zarr": _artifact(m * st, "M x sum_l (C_l + C_l^2) x 8"),
        "stats_shards": _artifact(
            m * c["stats"]["shards"] * st,
            "M x shards x sum_l (C_l + C_l^2) x 8, all on disk before the merge",
            kept=False,
        ),
        "synthesis_images": _artifact(n * chw * F32, "N x C x H x W x 4 (before compression)"),
        "synthesis_checkpoint": _artifact(
            ckpt, "3 x batch x C x H x W x 4 (x2 float64): images + Adam moments, one kept", False
        ),
        "isu_state": _artifact(st * m, "M x sum_l (C_l + C_l^2) x 8, one kept"),
        "synthesis_commit_records": _artifact(
            c["synthesis"]["batches"] * (24 * k + 24 * len(tf.channels) + 1024),
            "batches x (24 B x K loss curve + 24 B x layers + 1 KiB) JSON",
        ),
    }
    v = cfg.validation
    soft, hard = "soft" in v.protocols, "hard" in v.protocols
    labels = _artifact(
        cfg.labels.epochs * epoch,
        f"epochs x {epoch:,} B per epoch ({cfg.labels.format}, measured on random logits)",
        per_epoch=epoch,
    )
    students = v.students * sf.weight_bytes
    if soft:
        if fmt != "online":
            out["labels"] = labels
        out["student_weights"] = _artifact(students, "students x state_dict bytes")
    if hard:
        out["student_weights_hard"] = _artifact(students, "students x state_dict bytes")
    out["student_checkpoint"] = _artifact(
        sf.weight_bytes + s_slots * sf.params * F32, "weights + optimiser state", False
    )
    if v.random_real_baseline:
        out["baseline_images"] = _artifact(n * chw * F32, "N x C x H x W x 4")
        if soft:
            out["baseline_labels"] = _artifact(labels["bytes"], "as labels")
            out["baseline_student_weights"] = _artifact(students, "as student_weights")
        if hard:
            out["baseline_student_weights_hard"] = _artifact(students, "as student_weights")
    if v.coresets:
        sets = len(v.coresets)
        out["coreset_images"] = _artifact(
            sets * n * chw * F32, f"{sets} sets x N x C x H x W x 4 ({', '.join(v.coresets)})"
        )
        if soft:
            out["coreset_labels"] = _artifact(sets * labels["bytes"], f"{sets} sets x labels")
            out["coreset_student_weights"] = _artifact(
                sets * students, f"{sets} sets x students x state_dict bytes"
            )
        if hard:
            out["coreset_student_weights_hard"] = _artifact(
                sets * students, f"{sets} sets x students x state_dict bytes"
            )
    if v.full_data:
        out["full_data_student_weights"] = _artifact(
            v.full_data_students * sf.weight_bytes, "full_data_students x state_dict bytes"
        )
    return out


def checkpoint_writes(
    cfg: RunConfig, c: dict[str, dict[str, Any]], d: dict[str, Any], syn_hours: float | None
) -> dict[str, Any]:
    """Synthesis checkpoint write volume. A checkpoint is written at the end of an interval of
    `checkpoint_every` iterations, except the batch's last, once `checkpoint_seconds` have
    passed since the batch started or was last checkpointed (0: at every such boundary)."""
    s = c["synthesis"]
    seconds = float(getattr(cfg.synthesis, "checkpoint_seconds", 300.0))
    boundaries = s["intervals_per_batch"] - 1
    if seconds <= 0:
        per_batch: float | None = boundaries
    elif syn_hours is None:
        per_batch = None
    else:
        interval_s = syn_hours * 3600 / s["batches"] / s["intervals_per_batch"]
        every = max(1, math.ceil(seconds / interval_s)) if interval_s > 0 else 1
        per_batch = boundaries // every
    ckpt, isu = d["synthesis_checkpoint"]["bytes"], d["isu_state"]["bytes"]
    total = None if per_batch is None else s["batches"] * (per_batch * ckpt + isu)
    return {
        "checkpoint_seconds": seconds,
        "bytes_per_checkpoint": ckpt,
        "checkpoints_per_batch": per_batch,
        "checkpoints": None if per_batch is None else s["batches"] * per_batch,
        "isu_writes": s["batches"],
        "bytes_written": total,
    }
