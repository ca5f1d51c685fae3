"""Peak host and GPU memory per stage: the process baseline plus the largest phase's working
set (docs/plan.md, "Memory")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from storage.config import RunConfig
from tasks.stage_table import enabled, resolve
from tasks.stages.working_set import Work

from .data import max_class_images, planned_recipe
from .disk import optimizer_slots, stats_bytes
from .model import facts_for

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


def coreset_features(cfg: RunConfig, n_train: int) -> dict[str, Any]:
    """The coreset pass's feature matrix of one class: (largest class, D) and their sources."""
    f = facts_for(cfg, planned_recipe(cfg).arch)
    rows, rows_from = max_class_images(cfg, n_train)
    if f.penultimate:
        dim, dim_from = f.penultimate, "the teacher's last nn.Linear input"
    else:  # no Linear head: the widest measured layer, pooled
        dim, dim_from = max(f.channels), "assumed: the widest measured layer's channels"
    return {"rows": rows, "rows_source": rows_from, "dim": dim, "dim_source": dim_from}


def work(cfg: RunConfig, c: dict[str, dict[str, Any]]) -> Work:
    """The quantities the stages' working sets are written in (tasks/stages/working_set.py)."""
    n_train = c["stats"]["images"]
    feat = coreset_features(cfg, n_train) if cfg.validation.coresets else {"rows": 0, "dim": 0}
    return Work(
        cfg=cfg,
        p=planned_recipe(cfg),
        n=c["synthesis"]["images"],
        n_train=n_train,
        shards=c["stats"]["shards"],
        facts=lambda arch: facts_for(cfg, arch),
        backward=BACKWARD_BUFFERS,
        loader=lambda batch: _loader(cfg, n_train, batch),
        prefetch=_prefetch(cfg),
        optimizer_slots=optimizer_slots,
        stats_bytes=stats_bytes,
        coreset_rows=feat["rows"],
        coreset_dim=feat["dim"],
    )


def memory(cfg: RunConfig, c: dict[str, dict[str, Any]], mach: Machine) -> dict[str, Any]:
    """Peak host and GPU bytes per stage: the process baseline plus the largest phase's working
    set; on device "cpu" the device working set is host memory too."""
    w = work(cfg, c)
    stages: dict[str, dict[str, Any]] = {}
    for s in enabled(cfg):  # the stage table: each row's working set, stated by its runner
        for row, ref in s.plan.items():
            if row in c or row == "baseline_images":  # (the random subset has no count row)
                stages[row] = resolve(ref)(w)
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
