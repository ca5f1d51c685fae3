"""Estimated hours per stage: each stage's work in FLOPs over the FLOP rate a throughput table
measured for that kind of work (docs/plan.md, "Hours").

The tables ship with the package: `tasks/plan/throughput/<device kind>.json` (cpu.json, and
cuda.json once bench/gpu_smoke.sh or bench/bench_throughput.py has measured one on a GPU and
it is committed). The plan reads the table of the config's device kind; `--throughput FILE`
names another.
"""

from __future__ import annotations

import json
import math
import os
from importlib import resources
from pathlib import Path
from typing import Any

from storage.config import RunConfig

from .data import planned_recipe
from .model import ModelFacts, facts_for
from .stages import stage_order

TABLES = "throughput"  # the tables' folder in this package
GPU_TABLE_HINT = "run bench/gpu_smoke.sh on a GPU"


def device_kind(device: str) -> str:
    """ "cpu", "cuda", ...: the device without its index."""
    return device.split(":")[0]


def table_path(device: str) -> Path:
    """The packaged throughput table of a device kind (whether or not it exists)."""
    return Path(str(resources.files(__package__ or "tasks.plan") / TABLES)) / (
        f"{device_kind(device)}.json"
    )


def load_throughput(
    path: str | os.PathLike[str] | None, device: str = "cpu"
) -> tuple[dict[str, Any] | None, str]:
    """(table or None, its path): `path` (an error where it is missing), else the packaged
    table of the device's kind (None where there is none)."""
    p = Path(path) if path else table_path(device)
    if not p.is_file():
        if path:
            raise FileNotFoundError(f"throughput table {p} not found")
        return None, str(p)
    return json.loads(p.read_text()), str(p)


def missing_table(device: str) -> str:
    """What the hours column says where the device kind has no table."""
    kind = device_kind(device)
    if kind == "cuda":
        return f"no GPU table: {GPU_TABLE_HINT}"
    return f"no {kind} table: bench/bench_throughput.py --device {kind}"


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
    if table is None:
        out["missing"] = missing_table(cfg.device)
    if notes:
        out["notes"] = notes
    for stage in sorted(work, key=stage_order):
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
