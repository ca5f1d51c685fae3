"""`d3s status`: a run's progress as a record (name -> text, or a list of lines), read from its
manifest and checkpoint markers, never the checkpoints' tensors. Each stage of the stage table
(tasks/stage_table.py) names its function here; the CLI only prints the record. Numbers meant
for people (teacher, batch, student, epoch) are 1-based."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from storage.config import RunConfig, load_config
from storage.fs import RunFS
from storage.manifest import Manifest
from storage.profile import describe_profile, describe_recipe, read_profile
from storage.run import (
    BASELINE_KINDS,
    FULL_DATA,
    SYN_CHECKPOINT,
    baseline_prefix,
    labels_epoch,
    student_dir,
    summary_of,
    teacher_checkpoint,
    teacher_weights,
)
from storage.states import has_state, load_state, state_meta

from .stage_table import resolve, stages


@dataclass(frozen=True)
class StatusContext:
    """What every stage's status function reads: the run's files, config, finished artifacts
    (manifest entries) and data profile (None before the data stage)."""

    fs: RunFS
    cfg: RunConfig
    done: dict[str, Any]
    profile: dict[str, Any] | None


def run_status(fs: RunFS) -> dict[str, Any]:
    """The run's status record: its name and place, then each stage's lines (the paper's
    stages always, the optional ones where the config enables them)."""
    cfg = load_config(fs)
    ctx = StatusContext(fs, cfg, Manifest(fs).entries(), read_profile(fs))
    out: dict[str, Any] = {"run": cfg.name, "root": fs.url(), "preset": cfg.preset}
    for s in stages():
        if s.enabled(cfg) or not s.extra:
            out |= resolve(s.status)(ctx)
    return out


def _epochs_done(meta: dict[str, Any], key: str) -> int | None:
    """Epochs finished at a checkpoint, from its marker's metadata: `key` if the stage wrote
    it, else the per-epoch loss list (one loss per epoch done; teachers and students write it)."""
    if key in meta:
        return int(meta[key])
    if isinstance(meta.get("losses"), list):
        return len(meta["losses"])
    return None


def _in_progress(fs: RunFS, rel: str, what: str, of: int, epochs: int) -> str:
    """ ", teacher 1 of 2, epoch 3 of 4 done" for a checkpoint marker at `rel`; "" when there
    is none. Reads the JSON marker only, never the weights."""
    if not has_state(fs, rel):
        return ""
    done = _epochs_done(state_meta(fs, rel), "epoch")
    return f", {what} of {of}, " + (
        f"epoch {done} of {epochs} done" if done is not None else "in progress"
    )


def data(ctx: StatusContext) -> dict[str, Any]:
    p = ctx.profile
    return {
        "data": describe_profile(p) if p else "not profiled yet (the data stage does)",
        "recipe": describe_recipe(ctx.cfg, p["train_images"] if p else None).removeprefix(
            "recipe: "
        ),
        "warnings": p.get("warnings", []) if p else [],
    }


def teachers(ctx: StatusContext) -> dict[str, Any]:
    cfg, count = ctx.cfg, ctx.cfg.teachers.count
    finished = [teacher_weights(m) in ctx.done for m in range(count)]
    # Teachers train one after another; the one in progress has a checkpoint marker (removed
    # when it finishes). Its metadata holds one training loss per epoch done.
    epochs = cfg.teacher_train(ctx.profile["train_images"] if ctx.profile else None).epochs
    now = "".join(
        _in_progress(ctx.fs, teacher_checkpoint(m), f"teacher {m + 1}", count, epochs)
        for m in range(count)
        if not finished[m]
    )
    return {"teachers": f"{sum(finished)}/{count}" + now}


def stats(ctx: StatusContext) -> dict[str, Any]:
    count = ctx.cfg.teachers.count
    shards = "".join(
        f", teacher {m + 1}: {n} shards on disk"
        for m in range(count)
        if (
            n := len(
                [f for f in ctx.fs.listdir(f"stats_shards/teacher_{m}") if f.endswith(".json")]
            )
        )
    )
    merged = sum(f"stats.zarr/teacher_{m}" in ctx.done for m in range(count))
    return {"stats": f"{merged}/{count}" + shards}


def synthesis(ctx: StatusContext) -> dict[str, Any]:
    cfg, fs = ctx.cfg, ctx.fs
    k = ctx.profile["values"]["num_classes"] if ctx.profile else cfg.dataset.num_classes
    if k is None and cfg.dataset.kind in ("synthetic", "mnist5k"):
        k = cfg.preset_obj().num_classes if cfg.dataset.kind == "synthetic" else 10
    n_batches = -(-k * cfg.synthesis.ipc // cfg.synthesis.batch_size) if k else "?"
    committed = len([f for f in fs.listdir("synthesis/batches") if f.endswith(".json")])
    text = f"{committed}/{n_batches} batches"
    if has_state(fs, SYN_CHECKPOINT):  # the marker's metadata only, not the 345 MiB state
        meta = state_meta(fs, SYN_CHECKPOINT)
        if "iteration" in meta:
            iteration = int(meta["iteration"])
        elif "losses" in meta:  # older checkpoints: one loss per iteration done
            iteration = len(meta["losses"])
        else:
            iteration = int(load_state(fs, SYN_CHECKPOINT)[0]["iteration"])
        batch = meta.get("batch")
        text += (
            f", batch {int(batch) + 1 if batch is not None else '?'} at iteration "
            f"{iteration}/{cfg.synthesis_cfg().iterations}"
        )
    if "synthesis/images.zarr" in ctx.done:
        text += " (done)"
    return {"synthesis": text}


def labels(ctx: StatusContext) -> dict[str, Any]:
    n = ctx.cfg.labels.epochs
    return {"labels": f"{sum(labels_epoch(e) in ctx.done for e in range(n))}/{n} epochs"}


def validation(ctx: StatusContext) -> dict[str, Any]:
    cfg = ctx.cfg
    arch, n = cfg.student_arch(), cfg.validation.students
    finished = [s for s in range(n) if f"{student_dir(arch, s)}/metrics.json" in ctx.done]
    epochs = cfg.student_cfg().epochs
    now = "".join(
        _in_progress(ctx.fs, f"{student_dir(arch, s)}/checkpoint", f"student {s + 1}", n, epochs)
        for s in range(n)
        if s not in finished
    )
    end = " (done)" if summary_of() in ctx.done else ""
    return {"validation": f"{len(finished)}/{n} students" + now + end}


def validation_hard(ctx: StatusContext) -> dict[str, Any]:
    v, arch = ctx.cfg.validation, ctx.cfg.student_arch()
    hard = [student_dir(arch, s, "", "hard") for s in range(v.students)]
    n = sum(f"{d}/metrics.json" in ctx.done for d in hard)
    end = " (done)" if summary_of("", "hard") in ctx.done else ""
    return {"validation-hard": f"{n}/{v.students} students" + end}


def _baseline(ctx: StatusContext, kind: str) -> dict[str, Any]:
    """A baseline image set: whether its images are there, which protocols are done."""
    assert kind in BASELINE_KINDS
    prefix = baseline_prefix(kind)
    protocols = ["hard"] if prefix == FULL_DATA else ctx.cfg.validation.protocols
    parts = [f"{p} {'done' if summary_of(prefix, p) in ctx.done else 'to do'}" for p in protocols]
    images = "" if prefix == FULL_DATA or f"{prefix}images.zarr" not in ctx.done else "images, "
    return {f"baseline {kind}": images + ", ".join(parts)}


def baseline_random_real(ctx: StatusContext) -> dict[str, Any]:
    return _baseline(ctx, "random-real")


def baseline_coresets(ctx: StatusContext) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in ("herding", "k-center"):  # the table's order, whichever the config lists
        if method in ctx.cfg.validation.coresets:
            out |= _baseline(ctx, method)
    return out


def baseline_full_data(ctx: StatusContext) -> dict[str, Any]:
    return _baseline(ctx, "full-data")
