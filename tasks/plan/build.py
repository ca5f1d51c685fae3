"""`make_plan`: everything `d3s plan` prints, as a JSON-ready dict."""

from __future__ import annotations

import os
from typing import Any

from storage.config import RunConfig
from storage.profile import describe_recipe
from tasks.stage_table import enabled

from .counts import counts
from .data import observe_data, planned_recipe, shape_sources, train_images, with_data
from .disk import checkpoint_writes, disk
from .hours import device_kind, hours, load_throughput
from .memory import coreset_features, machine, memory
from .stages import ROW_ARTIFACTS
from .text import count_text


def make_plan(
    cfg: RunConfig,
    n_train: int | None = None,
    throughput: str | os.PathLike[str] | None = None,
    root: str | None = None,
    read_data: bool = True,
) -> dict[str, Any]:
    """Everything `d3s plan` prints, as a JSON-ready dict. `root`: the run's root, whose data
    profile is read where it has one; `read_data` False: the data is not read (the config's,
    the dataset kind's and the preset's values)."""
    data = observe_data(cfg, root) if read_data else None
    given = cfg
    cfg = with_data(cfg, data)
    n, source = train_images(cfg, n_train, data)
    table, table_path = load_throughput(throughput, cfg.device)
    # the process baseline: the device's table, else (no table for it yet) the CPU table's
    host_table = table
    if table is None and device_kind(cfg.device) != "cpu":
        host_table = load_throughput(None, "cpu")[0]
    c = counts(cfg, n)
    d = disk(cfg, c)
    mach = machine(host_table, from_cpu_table=host_table is not table)
    mem = memory(cfg, c, mach)
    h = hours(cfg, c, table)
    writes = checkpoint_writes(cfg, c, d, h["stages"]["synthesis"])
    rows: list[dict[str, Any]] = []
    for s in enabled(cfg):  # the stage table's stages for this config, in order
        if not s.plan:  # a stage the planner has no model of
            rows.append({"stage": s.name, "count": UNESTIMATED, "disk_bytes": None} | NONE)
        for stage in (k for k in s.plan if k in mem):
            if cfg.labels.format == "online" and stage.endswith("labels"):
                continue  # nothing stored: the students label each batch (their working set)
            rows.append(
                {
                    "stage": stage,
                    "count": count_text(stage, c),
                    "disk_bytes": sum(d[a]["bytes"] for a in ROW_ARTIFACTS[stage]),
                    "host_peak_bytes": mem[stage]["host_peak"],
                    "gpu_peak_bytes": mem[stage]["gpu_peak"],
                    "hours": h["stages"].get(stage),
                }
            )
    modelled = [r for r in rows if r["count"] != UNESTIMATED]
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
            "sources": shape_sources(given, data, source),
        },
        "train_images": {"count": n, "source": source},
        "recipe": describe_recipe(cfg, n),
        "data": {
            "read": data is not None,
            "where": data.where if data else _unread(given, read_data),
            "warnings": list(data.profile.get("warnings", [])) if data else [],
        },
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
            **({} if table else {"looked_for": table_path}),
        },
        "stages": rows,
        "totals": {
            "disk_bytes": kept,
            "host_peak_bytes": max(r["host_peak_bytes"] for r in modelled),
            "gpu_peak_bytes": None
            if not cfg.device.startswith("cuda")
            else max(r["gpu_peak_bytes"] for r in modelled),
            "hours": h["total"],
            "not_estimated": [r["stage"] for r in rows if r["count"] == UNESTIMATED],
        },
    }


UNESTIMATED = "not estimated (the planner has no model of this stage)"
NONE = {"host_peak_bytes": None, "gpu_peak_bytes": None, "hours": None}


def _unread(cfg: RunConfig, read_data: bool) -> str:
    d = cfg.dataset
    if not read_data:
        return "not read (--no-data)"
    if d.kind in ("mnist5k", "synthetic"):
        return f"not read: the {d.kind} kind's size and shape are known without it"
    return f"not read: {d.path} is not on this machine"
