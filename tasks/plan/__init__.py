"""`d3s plan`: what a run will need before it starts.

Counts of every stage's units of work, bytes on disk per artifact, peak host and GPU memory per
stage, and estimated hours from a measured throughput table (bench/bench_throughput.py). Nothing
heavy runs: the models are built on the `meta` device (shapes only), the label bytes per row are
measured by writing a few label batches of random logits, and the data's class count, size and
image shape come from the run's data profile: read from the run root, else measured as the run
measures it, where the data is on this machine (else the config's and the preset's values).
docs/plan.md states the memory model and every formula.

Modules, by concern: `data` (the data profile, training images, the recipe), `model` (a
model's facts on `meta`, the kinds of work), `counts`, `disk`, `memory`, `hours` (the
throughput tables, shipped in `throughput/`), `stages` (the plan's stage keys), `text`
(the readable table) and `build` (`make_plan`). The functions named after their modules
(`counts.counts`, `disk.disk`, `memory.memory`, `hours.hours`) are not re-exported here, so
that `tasks.plan.hours` and the others stay the modules.
"""

from __future__ import annotations

from .build import make_plan
from .data import (
    KNOWN_MAX_CLASS_IMAGES,
    KNOWN_TRAIN_IMAGES,
    DataFacts,
    max_class_images,
    observe_data,
    planned_recipe,
    train_images,
)
from .disk import checkpoint_writes, label_epoch_bytes, optimizer_slots, stats_bytes
from .hours import device_kind, load_throughput, rate, table_path
from .memory import BACKWARD_BUFFERS, Machine, coreset_features, machine, work
from .model import WORK_KINDS, ModelFacts, count_flops, facts_for, model_facts, prepare, work_step
from .stages import PLAN_STAGES, STAGE_DISK
from .text import format_plan, human_bytes, human_hours
from .units import F32, F64, GiB, ceil_div

__all__ = [
    "BACKWARD_BUFFERS",
    "F32",
    "F64",
    "GiB",
    "KNOWN_MAX_CLASS_IMAGES",
    "KNOWN_TRAIN_IMAGES",
    "PLAN_STAGES",
    "STAGE_DISK",
    "WORK_KINDS",
    "DataFacts",
    "Machine",
    "ModelFacts",
    "ceil_div",
    "checkpoint_writes",
    "coreset_features",
    "count_flops",
    "device_kind",
    "facts_for",
    "format_plan",
    "human_bytes",
    "human_hours",
    "label_epoch_bytes",
    "load_throughput",
    "machine",
    "work",
    "make_plan",
    "max_class_images",
    "model_facts",
    "observe_data",
    "optimizer_slots",
    "planned_recipe",
    "prepare",
    "rate",
    "stats_bytes",
    "table_path",
    "train_images",
    "work_step",
]
