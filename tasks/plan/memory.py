"""Peak host and GPU memory per stage: the process baseline plus the largest phase's working
set (docs/plan.md, "Memory")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from storage.config import RunConfig
from tasks.stages.coreset import CHUNK

from .data import max_class_images, planned_recipe
from .disk import optimizer_slots, stats_bytes
from .model import facts_for
from .units import F32, F64

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


# -- memory -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Machine:
    """Measured constants of the process: RSS with torch and the stage modules imported; the
    device memory a CUDA context takes before any tensor."""

    baseline_rss: int
    cuda_context: int
    source: str


def machine(table: dict[str, Any] | None, from_cpu_table: bool = False) -> Machine:
    """The process constants from a throughput table; `from_cpu_table`: the table is the CPU
    one, standing in for a device kind that has none yet (its CUDA context is then assumed)."""
    rss = (table or {}).get("process_rss_bytes", {})
    # after_work: the stage modules imported and a step of each kind of work run (the
    # kernels' code pages resident, as in a stage's process); older tables: the imports alone
    base = rss.get("after_work") or rss.get("stage_modules") or rss.get("torch")
    ctx = (table or {}).get("cuda_context_bytes")
    where = "CPU table: none for the run's device yet" if from_cpu_table else "throughput table"
    return Machine(
        int(base or DEFAULT_BASELINE_RSS),
        int(ctx or DEFAULT_CUDA_CONTEXT),
        where if base else "default (no measured baseline)",
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
