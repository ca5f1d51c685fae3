"""`d3s plan`: what a run will need before it starts, from its config alone.

Counts of every stage's units of work, bytes on disk per artifact, peak host and GPU memory per
stage, and estimated hours from a measured throughput table (bench/bench_throughput.py). Nothing
heavy runs: the models are built on the `meta` device (shapes only), the label bytes per row are
measured by writing a few label batches of random logits, and the dataset is not read (its size
comes from --train-images, the dataset kind, the preset's known size, or a count of files).
docs/plan.md states the memory model and every formula.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from storage.config import RunConfig

F32, F64 = 4, 8
GiB = 2**30
REPO = Path(__file__).resolve().parents[1]
DEFAULT_THROUGHPUT = REPO / "bench" / "throughput" / "cpu.json"

# Training images of the presets' datasets, for configs whose data is not on this machine.
KNOWN_TRAIN_IMAGES = {
    "imagenet-1k": 1_281_167,  # ILSVRC-2012 train
    # The paper's ImageNet-21K is Ridnik et al.'s ImageNet-21K-P, winter-21 release (10,450
    # classes, ~11 M images): 11,060,239 train / 522,500 validation (timm/imagenet-w21-p).
    "imagenet-21k": 11_060_239,
    "tiny-imagenet": 100_000,  # 200 classes x 500
}
MNIST5K_PER_CLASS, MNIST5K_CLASSES = 500, 10  # the bundled digits: 500 of each class

# The kinds of work a stage does, each timed by bench/bench_throughput.py and counted in FLOPs
# (torch.utils.flop_counter) by `work_step` on the same model.
WORK_KINDS = (
    "teacher_step",  # forward + backward to the weights, train mode
    "stats_forward",  # forward + the measured layers' sufficient statistics, no grad
    "synthesis_iteration",  # forward + batch moments + backward to the input, frozen model
    "label_forward",  # forward, no grad
    "student_step",  # forward + backward to the weights, train mode
)

# Small host-side vectors per distilled image (bytes): synthesis the classes (int64); labels
# and validation an epoch's permutation (int64), its batches as Python int lists (8-byte
# pointer + 28-byte int) and the label file's three index columns read back.
PER_IMAGE_BYTES = {"synthesis": 8, "labels": 64, "validation": 64, "baseline": 16}
# B x classes float32 logit copies alive at once (hard_device: the hard protocol's student
# logits and their gradient, no label batch).
LOGIT_COPIES = {
    "labels_device": 2,
    "labels_host": 4,
    "validation_device": 6,
    "validation_host": 3,
    "hard_device": 2,
}
KL_WORK_COPIES = 6  # C x C float64 per measured layer alive in Eq. 1's forward and backward
EVAL_BATCH = 256  # held_out_top1's batch
# Gradient and temporary buffers of a backward pass besides the saved activations, in units of
# the largest activation (per image). Calibrated on CPU (ResNet-18, 112 and 224 px, batches
# 8-48: peak RSS growth of one step minus the saved activations): training steps 2.7-3.8,
# synthesis iterations 5.0-5.6 (the measured layers' moments add a gradient per layer).
BACKWARD_BUFFERS = {"train": 4, "synthesis": 6}
DEFAULT_BASELINE_RSS = 600 * 2**20  # used when the throughput table lacks a measured one
DEFAULT_CUDA_CONTEXT = 600 * 2**20  # ditto; a CUDA context with cuDNN/cuBLAS loaded, typical


# -- the work of each kind, shared with the benchmark -----------------------------------------
def prepare(kind: str, model: nn.Module) -> nn.Module:
    """Train mode with weight gradients for the training steps; eval and frozen otherwise."""
    train = kind in ("teacher_step", "student_step")
    model.train(train)
    for p in model.parameters():
        p.requires_grad_(train)
    return model


def work_step(
    kind: str,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    layers: list[str],
    opt: torch.optim.Optimizer | None = None,
) -> None:
    """One unit of `kind` on the batch x: (B, C, H, W) normalised, y: (B,) classes. The model
    must be `prepare`d for the kind. Synthesis is the pipeline's iteration without the
    batch-size-independent KL (a few C x C Cholesky factorisations) and without the crops."""
    from d3s_core.layers import FeatureHooks
    from d3s_core.stats import SuffStats, batch_moments

    if kind == "stats_forward":
        reduce = partial(SuffStats.from_batch, precision="mixed")
        with torch.no_grad(), FeatureHooks(model, layers, reduce) as hooks:
            model(x)
            assert len(hooks.outputs) == len(layers)  # every measured layer was reduced
    elif kind == "label_forward":
        with torch.no_grad():
            model(x)
    elif kind in ("teacher_step", "student_step"):
        F.cross_entropy(model(x), y).backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    elif kind == "synthesis_iteration":
        images = x.detach().requires_grad_(True)
        with FeatureHooks(model, layers) as hooks:
            logits = model(images)
            moments = [batch_moments(a) for a in hooks.outputs]
        loss = F.cross_entropy(logits, y) + sum(m.sum() + c.sum() for m, c in moments)
        loss.backward()
    else:
        raise ValueError(f"unknown kind of work {kind!r}; expected one of {WORK_KINDS}")


def count_flops(kind: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, layers) -> float:
    """FLOPs of one `work_step` on x (torch's counter: matmuls and convolutions, 2 per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    prepare(kind, model)
    with FlopCounterMode(display=False) as counter:
        work_step(kind, model, x, y, layers)
    return float(counter.get_total_flops())


# -- a model's facts, on the meta device ------------------------------------------------------
@dataclass(frozen=True)
class ModelFacts:
    """Per image unless named otherwise; bytes for float32.

    saved_train: activations saved for backward in a training step; saved_input: the same for
    the gradient to the input of a frozen eval-mode model (synthesis); forward_live: alive at
    once in a no-grad forward (the largest module's input + output); largest_activation: the
    largest module output (the backward's gradient buffers are counted in multiples of it,
    `BACKWARD_BUFFERS`); largest_measured: the largest measured layer's output."""

    params: int
    weight_bytes: int  # state_dict (weights + buffers), float32
    channels: tuple[int, ...]  # C of each measured layer
    saved_train: int
    saved_input: int
    forward_live: int
    largest_activation: int
    largest_measured: int
    flops: dict[str, float]
    penultimate: int = 0  # D: in_features of the last nn.Linear (the coreset features); 0: none


def _saved_bytes(model: nn.Module, x: torch.Tensor, kind: str) -> int:
    """Bytes of the non-parameter tensors autograd saves in one forward (each tensor once)."""
    prepare(kind, model)
    own = {id(t) for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, tuple[torch.Tensor, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in own:
            seen[id(t)] = (t, t.numel() * t.element_size())  # keep t: ids stay unique
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x.requires_grad_(kind == "synthesis_iteration"))
    return sum(b for _, b in seen.values())


def _forward_sizes(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(max over leaf modules of input + output bytes, largest output bytes) of a forward."""
    sizes: list[tuple[int, int]] = []

    def nbytes(v: Any) -> int:
        ts = v if isinstance(v, (tuple, list)) else (v,)
        return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))

    def hook(_m: nn.Module, inp: Any, out: Any) -> None:
        sizes.append((nbytes(inp), nbytes(out)))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return max(i + o for i, o in sizes), max(o for _, o in sizes)


@lru_cache(maxsize=16)
def model_facts(
    arch: str,
    num_classes: int,
    in_chans: int,
    image_size: int,
    low_res: bool,
    width: int,
    layers_spec: str | tuple[str, ...] | None = None,
) -> ModelFacts:
    """The facts of one architecture at one input size, from forward passes on `meta` tensors
    (no memory, no arithmetic): batches of 1 and 2, so per-image terms are differences."""
    from d3s_core.layers import select_layers
    from d3s_core.models import build_model

    with torch.device("meta"):
        model = build_model(
            arch, num_classes, in_chans=in_chans, low_res=low_res, width=width
        ).float()
    spec = list(layers_spec) if isinstance(layers_spec, tuple) else layers_spec
    layers = select_layers(model, spec)
    modules = dict(model.named_modules())

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.empty(n, in_chans, image_size, image_size, device="meta")
        return x, torch.zeros(n, dtype=torch.int64, device="meta")

    def per_image(f) -> int:
        return f(batch(2)[0]) - f(batch(1)[0])

    saved_train = per_image(lambda x: _saved_bytes(model, x, "teacher_step"))
    saved_input = per_image(lambda x: _saved_bytes(model, x, "synthesis_iteration"))
    prepare("label_forward", model)
    live, largest = _forward_sizes(model, batch(1)[0])
    measured: dict[str, int] = {}

    def record(name: str):
        def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
            measured[name] = out.numel() * out.element_size()

        return hook

    handles = [modules[n].register_forward_hook(record(n)) for n in layers]
    with torch.no_grad():
        model(batch(1)[0])
    for h in handles:
        h.remove()
    x2, y2 = batch(2)
    flops = {k: count_flops(k, model, x2, y2, layers) / 2 for k in WORK_KINDS}
    state = model.state_dict()
    return ModelFacts(
        params=sum(p.numel() for p in model.parameters()),
        weight_bytes=sum(t.numel() * F32 for t in state.values() if t.is_floating_point())
        + sum(t.numel() * t.element_size() for t in state.values() if not t.is_floating_point()),
        channels=tuple(modules[n].out_channels for n in layers),  # type: ignore[misc]
        saved_train=saved_train,
        saved_input=saved_input,
        forward_live=live,
        largest_activation=largest,
        largest_measured=max(measured.values()),
        flops=flops,
        penultimate=_penultimate(model),
    )


def _penultimate(model: nn.Module) -> int:
    """Width of the features d3s_core.coresets.penultimate_features takes: the input of the
    model's last registered nn.Linear (0 if it has none)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].in_features if linears else 0


def planned_recipe(cfg: RunConfig):
    """The recipe the run will use, fitted to the data's shape as far as it is known without
    reading images: the declared `dataset.*` values, the class folders of a local ImageFolder
    tree, else the preset's (a run finds the rest from the data: docs/datasets.md)."""
    from d3s_core.presets import DataShape

    p, d = cfg.preset_obj(), cfg.dataset
    k = d.num_classes
    if k is None and d.kind == "imagefolder" and d.path and os.path.isdir(d.path):
        from storage.imagefolder import class_folders

        k = len(class_folders(d.path))
    if d.kind == "mnist5k":
        k, chans, size = 10, 1, 28
    else:
        chans, size = d.channels or p.in_chans, d.image_size or p.image_size
    mean = tuple(d.mean) if d.mean else (p.mean if len(p.mean) == chans else (0.5,) * chans)
    std = tuple(d.std) if d.std else (p.std if len(p.std) == chans else (0.25,) * chans)
    return cfg.fitted(DataShape(k or p.num_classes, chans, size, mean, std))


def facts_for(cfg: RunConfig, arch: str) -> ModelFacts:
    """Facts of the teachers (`arch` = the preset's: `stats.layers` names their measured
    layers) or of another architecture (students: the default layers, used by no stage)."""
    p = planned_recipe(cfg)
    layers = cfg.stats.layers if arch == p.arch else None
    spec = tuple(layers) if isinstance(layers, list) else layers
    return model_facts(arch, p.num_classes, p.in_chans, p.image_size, p.low_res, p.width, spec)


# -- the training set's size ------------------------------------------------------------------
def _count_image_files(root: str) -> int:
    from storage.imagefolder import IMAGE_EXTENSIONS

    n = 0
    for _, _, files in os.walk(root):
        n += sum(os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS for f in files)
    return n


def _stratified_train(per_class: list[int], test_fraction: float) -> int:
    """Training images left by storage.datasets.stratified_split (round per class)."""
    return sum(n - round(n * test_fraction) for n in per_class)


def train_images(cfg: RunConfig, given: int | None = None) -> tuple[int, str]:
    """(number of training images, where it came from)."""
    ds, p = cfg.dataset, planned_recipe(cfg)
    if given is not None:
        return given, "--train-images"
    if ds.kind == "mnist5k":
        n = _stratified_train([MNIST5K_PER_CLASS] * MNIST5K_CLASSES, ds.test_fraction)
        return n, f"mnist5k: 5,000 digits less the held-out {ds.test_fraction:g}"
    if ds.kind == "synthetic":
        per, extra = divmod(ds.synthetic_size, p.num_classes)
        counts = [per + (c < extra) for c in range(p.num_classes)]
        n = _stratified_train([c for c in counts if c], ds.test_fraction)
        return n, f"dataset.synthetic_size {ds.synthetic_size} less the held-out part"
    if p.name in KNOWN_TRAIN_IMAGES:
        return KNOWN_TRAIN_IMAGES[p.name], f"preset {p.name}'s known size (--train-images N)"
    if ds.kind == "imagefolder" and ds.path and os.path.isdir(ds.path):
        return _count_image_files(ds.path), f"image files counted under {ds.path}"
    raise ValueError(
        f"the size of the {ds.kind} dataset at {ds.path} is not known here: pass --train-images N"
    )


# The largest class of the presets' training sets (the coreset pass holds one class's features).
KNOWN_MAX_CLASS_IMAGES = {"imagenet-1k": 1300, "tiny-imagenet": 500}  # ILSVRC-2012: 732-1,300


def max_class_images(cfg: RunConfig, n_train: int) -> tuple[int, str]:
    """(training images of the largest class, where it came from): exact for the in-memory
    kinds and a local ImageFolder tree, the preset's known value, else an assumption."""
    ds, p = cfg.dataset, planned_recipe(cfg)
    if ds.kind == "mnist5k":
        return MNIST5K_PER_CLASS - round(MNIST5K_PER_CLASS * ds.test_fraction), "mnist5k"
    if ds.kind == "synthetic":
        per, extra = divmod(ds.synthetic_size, p.num_classes)
        big = per + (extra > 0)
        return big - round(big * ds.test_fraction), "dataset.synthetic_size"
    if p.name in KNOWN_MAX_CLASS_IMAGES:
        return min(KNOWN_MAX_CLASS_IMAGES[p.name], n_train), f"preset {p.name}'s largest class"
    if ds.kind == "imagefolder" and ds.path and os.path.isdir(ds.path):
        from storage.imagefolder import class_folders

        try:
            names = class_folders(ds.path)
        except ValueError:  # no class folders: the run will say so
            names = []
        if names:
            sizes = [_count_image_files(os.path.join(ds.path, c)) for c in names]
            return max(sizes), f"image files counted under {ds.path}"
    mean = ceil_div(n_train, p.num_classes)
    return min(2 * mean, n_train), "assumed: 2 x the mean class size"


# -- counts -----------------------------------------------------------------------------------
def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def counts(cfg: RunConfig, n_train: int) -> dict[str, dict[str, Any]]:
    p, t, s = planned_recipe(cfg), cfg.teacher_train(), cfg.stats
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


# -- label bytes ------------------------------------------------------------------------------
def _written_epoch_bytes(rows: int, classes: int, fmt: str, k: int, batch_size: int) -> int:
    from storage.fs import RunFS
    from storage.label_sizes import random_epoch
    from storage.labels import write_epoch

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
    epoch = label_epoch_bytes(
        n, p.num_classes, cfg.labels.format, cfg.labels.topk, cfg.labels.batch_size
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


# -- memory -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Machine:
    """Measured constants of the process: RSS with torch and the stage modules imported; the
    device memory a CUDA context takes before any tensor."""

    baseline_rss: int
    cuda_context: int
    source: str


def machine(table: dict[str, Any] | None) -> Machine:
    rss = (table or {}).get("process_rss_bytes", {})
    base = rss.get("stage_modules") or rss.get("torch")
    ctx = (table or {}).get("cuda_context_bytes")
    return Machine(
        int(base or DEFAULT_BASELINE_RSS),
        int(ctx or DEFAULT_CUDA_CONTEXT),
        "throughput table" if base else "default (no measured baseline)",
    )


def _prefetch(cfg: RunConfig) -> int:
    """Batches in flight in a DataLoader of `stats.workers` processes (2 each) + the one used."""
    return cfg.stats.workers * 2 + 1


def _loader(cfg: RunConfig, n_train: int, batch: int) -> dict[str, int]:
    """Host bytes of the training-set reader: the in-memory kinds hold the images (uint8, and
    the split's copy); file datasets ship uint8 batches from the workers."""
    p = planned_recipe(cfg)
    chw = p.in_chans * p.image_size * p.image_size
    if cfg.dataset.kind == "mnist5k":
        return {"dataset in memory (uint8, + split copy)": 2 * 5000 * chw}
    if cfg.dataset.kind == "synthetic":
        return {"dataset in memory (uint8, + split copy)": 2 * cfg.dataset.synthetic_size * chw}
    return {"loader prefetch (uint8 batches)": _prefetch(cfg) * batch * chw}


def _phase(host: dict[str, int], device: dict[str, int]) -> dict[str, dict[str, int]]:
    return {
        "host": {k: int(v) for k, v in host.items()},
        "device": {k: int(v) for k, v in device.items()},
    }


def _teachers_mem(cfg: RunConfig, n_train: int) -> dict[str, Any]:
    p, t = planned_recipe(cfg), cfg.teacher_train()
    f = facts_for(cfg, p.arch)
    chw = p.in_chans * p.image_size * p.image_size
    opt = optimizer_slots(t.optimizer, t.momentum) * f.params * F32
    device = {
        "weights + grads": f.weight_bytes + f.params * F32,
        "optimiser state": opt,
        "batch x (image + saved activations)": t.batch_size * (chw * F32 + f.saved_train),
        "backward buffers": t.batch_size * BACKWARD_BUFFERS["train"] * f.largest_activation,
    }
    host = {
        **_loader(cfg, n_train, t.batch_size),
        "checkpoint write (2 copies)": 2 * (f.weight_bytes + device["optimiser state"]),
    }
    return {"train": _phase(host, device)}


def _stats_mem(cfg: RunConfig, n_train: int, shards: int) -> dict[str, Any]:
    p, s = planned_recipe(cfg), cfg.stats
    f = facts_for(cfg, p.arch)
    chw = p.in_chans * p.image_size * p.image_size
    m, st = cfg.teachers.count, stats_bytes(f.channels)
    centred = F64 if s.precision == "float64" else F32
    device = {
        "M x weights": m * f.weight_bytes,
        "batch x (image + forward + centred buffer)": s.batch_size
        * (chw * F32 + f.forward_live + f.largest_measured * centred // F32),
        "accumulators (M x layers x C^2 float64, x2 while merging)": 2 * m * st,
    }
    host = {**_loader(cfg, n_train, s.batch_size), "shard write (2 copies)": 2 * st}
    merge = {"one teacher's shards loaded for the merge": shards * st, "merged + written": 2 * st}
    return {"pass": _phase(host, device), "merge": _phase(merge, {})}


def _synthesis_mem(cfg: RunConfig, n: int) -> dict[str, Any]:
    p, scfg = planned_recipe(cfg), cfg.synthesis_cfg()
    f = facts_for(cfg, p.arch)
    wide = 2 if scfg.dtype == "float64" else 1
    b = cfg.synthesis.batch_size
    img = p.in_chans * p.image_size * p.image_size * F32 * wide
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
        "backward buffers": b * BACKWARD_BUFFERS["synthesis"] * f.largest_activation * wide,
        "Eq. 1 working set (one teacher)": KL_WORK_COPIES * sq,
        "crop draws of an interval": b * cfg.synthesis.checkpoint_every * 17,
    }
    host = {
        "checkpoint snapshot + clone + blob": 3 * ckpt,
        "ISU state write (2 copies)": 2 * m * (lin + sq),
        "per-image classes (int64)": n * PER_IMAGE_BYTES["synthesis"],
    }
    return {"iterate": _phase(host, device)}


def _labels_mem(cfg: RunConfig, n: int) -> dict[str, Any]:
    p = planned_recipe(cfg)
    f = facts_for(cfg, p.arch)
    b, k = cfg.labels.batch_size, p.num_classes
    img = p.in_chans * p.image_size * p.image_size * F32
    m = cfg.teachers.count
    lab = m if cfg.labels.teachers == "ensemble" else 1
    device = {
        "M x teacher weights": m * f.weight_bytes,
        "batch x (rows + crops + forward)": b * (2 * img + f.forward_live),
        "logits (each labeller + mean)": b * k * F32 * (lab + LOGIT_COPIES["labels_device"]),
    }
    host = {
        "prefetched image rows (workers x 2 + 1)": _prefetch(cfg) * b * img,
        "label batch on its way to Parquet": b * k * F32 * LOGIT_COPIES["labels_host"],
        "per-image index vectors": n * PER_IMAGE_BYTES["labels"],
    }
    return {"label": _phase(host, device)}


def _student_shapes(cfg: RunConfig):
    """(recipe, the student's model facts, batch size, classes, C*H*W) of validation students."""
    p = planned_recipe(cfg)
    f = facts_for(cfg, cfg.student_arch())
    return p, f, cfg.labels.batch_size, p.num_classes, p.in_chans * p.image_size * p.image_size


def _student_train_device(cfg: RunConfig, what: str) -> dict[str, int]:
    """A training student's device working set: weights, grads, optimiser state, one batch of
    `what` with its crops and saved activations, backward buffers."""
    p, f, b, _, chw = _student_shapes(cfg)
    opt = optimizer_slots(p.student.optimizer, p.student.momentum) * f.params * F32
    return {
        "weights + grads": f.weight_bytes + f.params * F32,
        "optimiser state": opt,
        f"batch x ({what} + crops + saved activations)": b * (2 * chw * F32 + f.saved_train),
        "backward buffers": b * BACKWARD_BUFFERS["train"] * f.largest_activation,
    }


def _validation_mem(cfg: RunConfig, n: int, n_train: int, hard: bool = False) -> dict[str, Any]:
    """Students on an image set of n images; `hard`: on its class labels (no label batch: the
    logits are the student's and their gradient)."""
    p, f, b, k, chw = _student_shapes(cfg)
    device = _student_train_device(cfg, "rows")
    host = {"prefetched image rows (workers x 2 + 1)": _prefetch(cfg) * b * chw * F32}
    if hard:
        device["logits (student + grads)"] = b * k * F32 * LOGIT_COPIES["hard_device"]
    else:
        device["logits (labels, student, softmaxes, grads)"] = (
            b * k * F32 * LOGIT_COPIES["validation_device"]
        )
        host["label batch read back"] = b * k * F32 * LOGIT_COPIES["validation_host"]
    host["per-image index vectors"] = n * PER_IMAGE_BYTES["validation"]
    host["checkpoint write (2 copies)"] = 2 * (f.weight_bytes + device["optimiser state"])
    held = {
        "weights": f.weight_bytes,
        "held-out batch x (image + forward)": EVAL_BATCH * (chw * F32 + f.forward_live),
    }
    return {
        "train": _phase(host, device),
        "held-out": _phase(_loader(cfg, n_train, EVAL_BATCH), held),
    }


def _baseline_subset_mem(cfg: RunConfig, n: int, n_train: int) -> dict[str, Any]:
    """The random real subset, written one synthesis-batch-sized chunk at a time."""
    p = planned_recipe(cfg)
    chw = p.in_chans * p.image_size * p.image_size
    b = cfg.synthesis.batch_size
    host = {
        **_loader(cfg, n_train, b),
        "chunk (float32)": b * chw * F32,
        "per-class training rows (int64)": n_train * 8,
        "per-image classes + picks": n * PER_IMAGE_BYTES["baseline"],
    }
    return {"subset": _phase(host, {"chunk (float32)": b * chw * F32})}


def coreset_features(cfg: RunConfig, n_train: int) -> dict[str, Any]:
    """The coreset pass's feature matrix of one class: (largest class, D) and their sources."""
    f = facts_for(cfg, planned_recipe(cfg).arch)
    rows, rows_from = max_class_images(cfg, n_train)
    if f.penultimate:
        dim, dim_from = f.penultimate, "the teacher's last nn.Linear input"
    else:  # no Linear head: the widest measured layer, pooled
        dim, dim_from = max(f.channels), "assumed: the widest measured layer's channels"
    return {"rows": rows, "rows_source": rows_from, "dim": dim, "dim_source": dim_from}


def _coreset_pass_mem(cfg: RunConfig, n_train: int) -> dict[str, Any]:
    """One pass over the training set through the coreset teacher, class by class, in chunks
    of `CHUNK` images; each method selects IPC of one class's features at a time."""
    from tasks.stages.coreset import CHUNK

    p = planned_recipe(cfg)
    f = facts_for(cfg, p.arch)
    chw = p.in_chans * p.image_size * p.image_size
    feat = coreset_features(cfg, n_train)
    rows, dim = feat["rows"], feat["dim"]
    sets, k, ipc = len(cfg.validation.coresets), p.num_classes, cfg.synthesis.ipc
    device = {
        "teacher weights": f.weight_bytes,
        "chunk x (image + forward)": CHUNK * (chw * F32 + f.forward_live),
        # float32 (the chunks' features concatenated) + the selection's float64 copy
        f"one class's features ({rows:,} x {dim:,}: float32 + float64)": rows * dim * (F32 + F64),
    }
    host = {
        **_loader(cfg, n_train, CHUNK),
        "per-class training rows (int64)": n_train * 8,
        "selections (sets x classes x IPC int64, + checkpoint copy)": 2 * sets * k * ipc * 8,
    }
    return {"pass": _phase(host, device)}


def _full_data_mem(cfg: RunConfig, n_train: int) -> dict[str, Any]:
    """Hard-protocol students on the whole training set, streamed through the run's
    DataLoader in batches of labels.batch_size: teacher training's working set with the
    student's architecture and optimiser (and the crops of the hard protocol)."""
    p, f, b, k, chw = _student_shapes(cfg)
    device = {
        **_student_train_device(cfg, "image"),
        "logits (student + grads)": b * k * F32 * LOGIT_COPIES["hard_device"],
    }
    host = {
        **_loader(cfg, n_train, b),
        "epoch permutation (int64)": n_train * 8,
        "checkpoint write (2 copies)": 2 * (f.weight_bytes + device["optimiser state"]),
    }
    held = {
        "weights": f.weight_bytes,
        "held-out batch x (image + forward)": EVAL_BATCH * (chw * F32 + f.forward_live),
    }
    return {
        "train": _phase(host, device),
        "held-out": _phase(_loader(cfg, n_train, EVAL_BATCH), held),
    }


def memory(cfg: RunConfig, c: dict[str, dict[str, Any]], mach: Machine) -> dict[str, Any]:
    """Peak host and GPU bytes per stage: the process baseline plus the largest phase's working
    set; on device "cpu" the device working set is host memory too."""
    n, n_train = c["synthesis"]["images"], c["stats"]["images"]
    stages: dict[str, dict[str, Any]] = {
        "teachers": _teachers_mem(cfg, n_train),
        "stats": _stats_mem(cfg, n_train, c["stats"]["shards"]),
        "synthesis": _synthesis_mem(cfg, n),
    }
    labels = _labels_mem(cfg, n)
    soft = _validation_mem(cfg, n, n_train)
    hard = _validation_mem(cfg, n, n_train, hard=True)
    groups = {"labels": labels, "validation": soft, "validation_hard": hard}
    for prefix in ("", "baseline_", "coreset_"):
        if prefix == "baseline_" and cfg.validation.random_real_baseline:
            stages["baseline_images"] = _baseline_subset_mem(cfg, n, n_train)
        if prefix == "coreset_" and cfg.validation.coresets:
            # the pass, then each set written as the random-real baseline's is
            stages["coresets"] = {
                **_coreset_pass_mem(cfg, n_train),
                "write": _baseline_subset_mem(cfg, n, n_train)["subset"],
            }
        for name, phases in groups.items():
            if prefix + name in c:
                stages[prefix + name] = phases
    if "full_data" in c:
        stages["full_data"] = _full_data_mem(cfg, n_train)
    gpu = cfg.device.startswith("cuda")
    out = {}
    for name, phases in stages.items():
        hosts, devices = [], []
        for ph in phases.values():
            dev = sum(ph["device"].values())
            hosts.append(sum(ph["host"].values()) + (0 if gpu else dev))
            devices.append(dev)
        out[name] = {
            "host_peak": mach.baseline_rss + max(hosts),
            "gpu_peak": mach.cuda_context + max(devices) if gpu else None,
            "phases": phases,
        }
    return out


# -- hours ------------------------------------------------------------------------------------
def load_throughput(path: str | os.PathLike[str] | None) -> tuple[dict[str, Any] | None, str]:
    p = Path(path) if path else DEFAULT_THROUGHPUT
    if not p.is_file():
        if path:
            raise FileNotFoundError(f"throughput table {p} not found")
        return None, str(p)
    return json.loads(p.read_text()), str(p)


def rate(table: dict[str, Any], kind: str, flops_per_image: float) -> tuple[float, str] | None:
    """(FLOP/s, point name) for `kind`: the rate measured at the table's point whose FLOPs per
    image are nearest (in ratio) to this model's; None where the table has no such entry."""
    best = None
    for point in table.get("points", []):
        w = point.get("work", {}).get(kind)
        if not w or not w.get("flops_per_s"):
            continue
        dist = abs(math.log(max(w["flops_per_image"], 1.0) / max(flops_per_image, 1.0)))
        if best is None or dist < best[0]:
            best = (dist, float(w["flops_per_s"]), point["name"])
    return None if best is None else (best[1], best[2])


def hours(
    cfg: RunConfig, c: dict[str, dict[str, Any]], table: dict[str, Any] | None
) -> dict[str, Any]:
    """Estimated device-hours per stage: work FLOPs / the measured FLOP rate of its kind."""
    p = planned_recipe(cfg)
    tf, sf = facts_for(cfg, p.arch), facts_for(cfg, cfg.student_arch())
    t, s, y = (c[k] for k in ("teachers", "stats", "synthesis"))
    m = cfg.teachers.count
    work: dict[str, list[tuple[str, ModelFacts, int]]] = {
        "teachers": [("teacher_step", tf, m * t["epochs"] * t["train_images"])],
        "stats": [("stats_forward", tf, m * s["images"])],
        "synthesis": [
            ("synthesis_iteration", tf, y["images"] * y["iterations_per_batch"]),
            ("stats_forward", tf, m * y["images"]),  # the ISU update after each batch
        ],
    }
    notes: dict[str, str] = {}
    for stage, x in c.items():
        sets = x.get("sets", 1)
        if stage.endswith("labels"):
            images = sets * x["labellers"] * x["epochs"] * x["images"]
            work[stage] = [("label_forward", tf, images)]
        elif "validation" in stage:  # soft and hard students alike: a training step each
            work[stage] = [("student_step", sf, sets * x["students"] * x["epochs"] * x["images"])]
    if cfg.validation.random_real_baseline:
        work["baseline_images"] = []  # reading and writing N real images: I/O, not modelled
    if "coresets" in c:
        # The feature pass is a no-grad eval-mode forward of one teacher per training image,
        # which is what label_forward measures (stats_forward adds the layers' statistics).
        work["coresets"] = [("label_forward", tf, c["coresets"]["images"])]
        notes["coresets"] = (
            "label_forward (the same no-grad eval forward of one teacher, the nearest measured "
            "kind) x n training images; writing the sets is I/O, not modelled"
        )
    if "full_data" in c:
        x = c["full_data"]
        # Teacher training's work with the student's architecture: student_step is that kind
        # (forward + backward to the weights) measured at the student's FLOPs per image.
        work["full_data"] = [("student_step", sf, x["students"] * x["epochs"] * x["images"])]
        notes["full_data"] = (
            f"student_step ({x['arch']}: teacher training's work with the student "
            "architecture) x full_data_students x full_data_epochs x n training images"
        )
    if any(k.endswith("validation_hard") for k in c):
        notes["validation_hard"] = (
            "student_step, as the soft protocol's students (cross-entropy on the class labels)"
        )
    out: dict[str, Any] = {"stages": {}, "points": {}}
    if notes:
        out["notes"] = notes
    for stage in sorted(work, key=list(STAGE_DISK).index):
        items = work[stage]
        total: float | None = 0.0
        for kind, f, images in items:
            r = None if table is None else rate(table, kind, f.flops[kind])
            if images and r is None:
                total = None
            elif images and r is not None and total is not None:
                total += images * f.flops[kind] / r[0] / 3600
                out["points"][kind] = r[1]
        out["stages"][stage] = total
    known = [h for h in out["stages"].values() if h is not None]
    out["total"] = sum(known) if len(known) == len(out["stages"]) else None
    return out


# -- the plan ---------------------------------------------------------------------------------
STAGE_DISK = {  # in the flow's order (the table's rows and the hours' keys follow it)
    "teachers": ["teacher_weights"],
    "stats": ["stats_zarr"],
    "synthesis": ["synthesis_images", "isu_state", "synthesis_commit_records"],
    "labels": ["labels"],
    "validation": ["student_weights"],
    "validation_hard": ["student_weights_hard"],
    "baseline_images": ["baseline_images"],
    "baseline_labels": ["baseline_labels"],
    "baseline_validation": ["baseline_student_weights"],
    "baseline_validation_hard": ["baseline_student_weights_hard"],
    "coresets": ["coreset_images"],
    "coreset_labels": ["coreset_labels"],
    "coreset_validation": ["coreset_student_weights"],
    "coreset_validation_hard": ["coreset_student_weights_hard"],
    "full_data": ["full_data_student_weights"],
}


def _count_text(stage: str, c: dict[str, dict[str, Any]]) -> str:
    x = c.get(stage.replace("baseline_images", "synthesis"), {})
    sets = f"{x['sets']} sets x " if "sets" in x else ""
    if stage == "coresets":
        return (
            f"{x['images']:,} images through teacher {x['teacher']}, "
            f"{x['sets']} sets of {x['set_images']:,}"
        )
    if stage == "teachers":
        if not x["trained"]:
            return f"{x['teachers']} imported"
        return f"{x['teachers']} x {x['epochs']} epochs x {x['steps_per_epoch']:,} steps"
    if stage == "stats":
        return f"{x['images']:,} images, {x['batches']:,} batches, {x['shards']:,} shards"
    if stage == "synthesis":
        return f"{x['batches']:,} batches x {x['iterations_per_batch']:,} iterations"
    if stage == "baseline_images":
        return f"{x['images']:,} real images"
    if stage.endswith("labels"):
        return f"{sets}{x['epochs']} epochs x {x['batches_per_epoch']:,} batches"
    return f"{sets}{x['students']} x {x['epochs']} epochs x {x['steps_per_epoch']:,} steps"


def make_plan(
    cfg: RunConfig, n_train: int | None = None, throughput: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """Everything `d3s plan` prints, as a JSON-ready dict."""
    n, source = train_images(cfg, n_train)
    table, table_path = load_throughput(throughput)
    c = counts(cfg, n)
    d = disk(cfg, c)
    mach = machine(table)
    mem = memory(cfg, c, mach)
    h = hours(cfg, c, table)
    writes = checkpoint_writes(cfg, c, d, h["stages"]["synthesis"])
    rows = []
    for stage in mem:
        rows.append(
            {
                "stage": stage,
                "count": _count_text(stage, c),
                "disk_bytes": sum(d[a]["bytes"] for a in STAGE_DISK[stage]),
                "host_peak_bytes": mem[stage]["host_peak"],
                "gpu_peak_bytes": mem[stage]["gpu_peak"],
                "hours": h["stages"].get(stage),
            }
        )
    kept = sum(a["bytes"] for a in d.values() if a["kept"])
    transient = ["teacher_checkpoint", "stats_shards", "synthesis_checkpoint", "student_checkpoint"]
    p = planned_recipe(cfg)
    return {
        "config": {"name": cfg.name, "preset": cfg.preset, "device": cfg.device},
        "shape": {
            "classes": p.num_classes,
            "image": [p.in_chans, p.image_size, p.image_size],
            "ipc": cfg.synthesis.ipc,
            "distilled_images": c["synthesis"]["images"],
        },
        "train_images": {"count": n, "source": source},
        "counts": c,
        "disk": {
            "artifacts": d,
            "total_bytes": kept,
            "largest_transient_bytes": max(d[a]["bytes"] for a in transient),
            "synthesis_writes": writes,
        },
        "memory": {
            "baseline_rss_bytes": mach.baseline_rss,
            "baseline_source": mach.source,
            "cuda_context_bytes": mach.cuda_context if cfg.device.startswith("cuda") else None,
            "stages": mem,
            **({"coreset_features": coreset_features(cfg, n)} if cfg.validation.coresets else {}),
        },
        "hours": h,
        "throughput": {
            "file": table_path if table else None,
            "device": (table or {}).get("device"),
            "measured": (table or {}).get("date"),
            "machine": (table or {}).get("machine", {}).get("description"),
        },
        "stages": rows,
        "totals": {
            "disk_bytes": kept,
            "host_peak_bytes": max(r["host_peak_bytes"] for r in rows),
            "gpu_peak_bytes": None
            if not cfg.device.startswith("cuda")
            else max(r["gpu_peak_bytes"] for r in rows),
            "hours": h["total"],
        },
    }


# -- text -------------------------------------------------------------------------------------
def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def human_hours(h: float | None) -> str:
    if h is None:
        return "?"
    if h < 1 / 60:
        return f"{h * 3600:.0f} s"
    if h < 1:
        return f"{h * 60:.1f} min"
    return f"{h:.1f} h"


def format_plan(plan: dict[str, Any]) -> str:
    """The readable table and the notes behind it."""
    cfg, shape, tr = plan["config"], plan["shape"], plan["train_images"]
    lines = [
        f"plan for {cfg['name']} (preset {cfg['preset']}, device {cfg['device']}): "
        f"{shape['classes']:,} classes x IPC {shape['ipc']} = "
        f"{shape['distilled_images']:,} images of {'x'.join(map(str, shape['image']))}",
        f"training images: {tr['count']:,} ({tr['source']})",
        "",
    ]
    head = ("stage", "count", "disk", "peak host", "peak GPU", "hours")
    body = [
        (
            r["stage"],
            r["count"],
            human_bytes(r["disk_bytes"]),
            human_bytes(r["host_peak_bytes"]),
            human_bytes(r["gpu_peak_bytes"]),
            human_hours(r["hours"]),
        )
        for r in plan["stages"]
    ]
    t = plan["totals"]
    body.append(
        (
            "total",
            "",
            human_bytes(t["disk_bytes"]),
            human_bytes(t["host_peak_bytes"]),
            human_bytes(t["gpu_peak_bytes"]),
            human_hours(t["hours"]),
        )
    )
    widths = [max(len(row[i]) for row in (head, *body)) for i in range(len(head))]
    for i, row in enumerate((head, *body)):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [v.rjust(w) for v, w in zip(row[2:], widths[2:], strict=True)]
        lines.append("  ".join(cells).rstrip())
        if i == 0 or i == len(body) - 1:
            lines.append("  ".join("-" * w for w in widths))
    d = plan["disk"]
    lines += ["", "disk per artifact (kept unless marked transient):"]
    wide = max(26, *map(len, d["artifacts"]))
    for name, a in d["artifacts"].items():
        mark = "" if a["kept"] else "  (transient)"
        lines.append(f"  {name:<{wide}} {human_bytes(a['bytes']):>11}  {a['formula']}{mark}")
    w = d["synthesis_writes"]
    per = w["checkpoints_per_batch"]
    lines.append(
        f"  synthesis writes: {human_bytes(w['bytes_per_checkpoint'])} per checkpoint x "
        + (f"{w['checkpoints']:,} checkpoints" if per is not None else "? checkpoints")
        + f" (checkpoint_seconds {w['checkpoint_seconds']:g}) + {w['isu_writes']:,} ISU states"
        + f" = {human_bytes(w['bytes_written'])}"
    )
    mem, th = plan["memory"], plan["throughput"]
    lines += [
        "",
        f"memory: process baseline {human_bytes(mem['baseline_rss_bytes'])} "
        f"({mem['baseline_source']})"
        + (
            f", CUDA context {human_bytes(mem['cuda_context_bytes'])}"
            if mem["cuda_context_bytes"]
            else ""
        )
        + "; per-stage working sets in --json (docs/plan.md)",
    ]
    if "coreset_features" in mem:
        f = mem["coreset_features"]
        lines.append(
            f"  coresets: one class's features at a time, {f['rows']:,} images "
            f"({f['rows_source']}) x D = {f['dim']:,} ({f['dim_source']})"
        )
    if th["file"]:
        used = ", ".join(f"{k} at {v}" for k, v in plan["hours"]["points"].items())
        lines.append(
            f"hours: an ESTIMATE from {th['file']} ({th['device']}, {th['machine']}, measured "
            f"{th['measured']}): work FLOPs / measured FLOP/s ({used}); data loading, "
            "checkpoint I/O and the KL's Cholesky factorisations are not in it"
        )
        if th["device"] and th["device"].split(":")[0] != cfg["device"].split(":")[0]:
            lines.append(
                f"WARNING: this run is on {cfg['device']}, the table was measured on "
                f"{th['device']}: pass --throughput with a table measured there"
            )
    else:
        lines.append("hours: no throughput table (bench/bench_throughput.py writes one)")
    # how the new stages' hours are counted, after the hours line (before any warning)
    at = next((i for i, x in enumerate(lines) if x.startswith("hours:")), len(lines)) + 1
    notes = plan["hours"].get("notes", {})
    lines[at:at] = [f"  {stage}: {note}" for stage, note in notes.items()]
    return "\n".join(lines)
