"""Optimisers and per-step learning-rate schedules for teachers and students (Tables 8, 10)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch

__all__ = [
    "lr_factor",
    "make_optimizer",
    "make_scheduler",
]

OptimizerName = Literal["sgd", "adamw"]
ScheduleName = Literal["cosine", "step", "onecycle", "constant"]


def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: OptimizerName,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected 'sgd' or 'adamw'")


def lr_factor(
    schedule: ScheduleName,
    step: int,
    total_steps: int,
    warmup_steps: int = 0,
    step_every: int = 0,
    gamma: float = 0.1,
) -> float:
    """Multiplier of the base learning rate at optimiser step `step` (0-indexed).

    cosine: linear warm-up over `warmup_steps`, then cosine to 0 at `total_steps` (Table 8/10);
    step: times gamma every `step_every` steps (ImageNet-1K teachers: every 30 epochs);
    onecycle: linear up over the first 30 % then cosine down (ImageNet-21K teachers).
    """
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return gamma ** (step // max(1, step_every))
    if schedule == "onecycle":
        peak = max(1, int(0.3 * total_steps))
        if step < peak:
            return (step + 1) / peak
        return 0.5 * (1 + math.cos(math.pi * (step - peak) / max(1, total_steps - peak)))
    if schedule == "cosine":
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / span))
    raise ValueError(f"unknown schedule {schedule!r}")


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: ScheduleName,
    total_steps: int,
    warmup_steps: int = 0,
    step_every: int = 0,
    gamma: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR around `lr_factor`; its state_dict is plain ints and floats."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(schedule, s, total_steps, warmup_steps, step_every, gamma),
    )
