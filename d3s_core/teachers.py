"""Supervised teacher training with explicit state for resume (Table 8).

The whole loop state (weights, optimiser and schedule state, epoch, RNG) is `TeacherState`,
plain tensors and numbers, so a run continues from a saved state exactly as if it had not
stopped. Data arrives as batches of tensors; where they come from is the caller's business.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, get_args

import torch
import torch.nn.functional as F
from torch import nn

from .augment import apply_crops, draw_crops
from .optim import OptimizerName, ScheduleName, make_optimizer, make_scheduler

__all__ = [
    "TeacherState",
    "TeacherTrainConfig",
    "TeacherTrainer",
    "check_bool",
    "check_choice",
    "check_numbers",
    "check_range",
]


@dataclass(frozen=True)
class TeacherTrainConfig:
    """Teacher recipe (Table 8). warmup/step_every are in epochs."""

    optimizer: OptimizerName = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 256
    epochs: int = 90
    schedule: ScheduleName = "step"
    warmup_epochs: int = 0
    step_every_epochs: int = 30
    gamma: float = 0.1
    min_crop_scale: float = 0.08
    flip: bool = True
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        check_choice("optimizer", self.optimizer, OptimizerName)
        check_range("lr", self.lr, gt=0)
        check_range("momentum", self.momentum, ge=0, lt=1)
        check_range("weight_decay", self.weight_decay, ge=0)
        check_range("batch_size", self.batch_size, ge=1, integer=True)
        check_range("epochs", self.epochs, ge=1, integer=True)
        check_choice("schedule", self.schedule, ScheduleName)
        check_range("warmup_epochs", self.warmup_epochs, ge=0, integer=True)
        check_range("step_every_epochs", self.step_every_epochs, ge=1, integer=True)
        check_range("gamma", self.gamma, gt=0, le=1)
        check_range("min_crop_scale", self.min_crop_scale, gt=0, le=1)
        check_bool("flip", self.flip)
        check_range("label_smoothing", self.label_smoothing, ge=0, lt=1)


# -- value checks shared by the config dataclasses (TeacherTrainConfig, SynthesisConfig) -------
# Each raises ValueError("<name>: <value> must be ..."); storage/config.py prefixes the section.


def check_range(
    name: str,
    value: object,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    integer: bool = False,
) -> None:
    """`value` is a finite number (an int if `integer`; never a bool) within the bounds."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ValueError(f"{name}: {value!r} must be {kind}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: {value!r} must be a finite number")
    low_ok = (gt is None or value > gt) and (ge is None or value >= ge)
    high_ok = (lt is None or value < lt) and (le is None or value <= le)
    if low_ok and high_ok:
        return
    low = f"({gt:g}" if gt is not None else f"[{ge:g}" if ge is not None else None
    high = f"{lt:g})" if lt is not None else f"{le:g}]" if le is not None else None
    if low and high:
        rule = f"in {low}, {high}"
    elif low:
        rule = f"> {gt:g}" if gt is not None else f">= {ge:g}"
    else:
        rule = f"< {lt:g}" if lt is not None else f"<= {le:g}"
    raise ValueError(f"{name}: {value!r} must be {rule}")


def check_numbers(name: str, value: object, length: int | None = None) -> tuple[Any, ...]:
    """`value` is a non-empty list/tuple (of `length` items if given); returns it as a tuple."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        want = f"a list of {length} numbers" if length else "a non-empty list of numbers"
        raise ValueError(f"{name}: {value!r} must be {want}")
    if length is not None and len(value) != length:
        raise ValueError(f"{name}: {list(value)!r} must have {length} values, not {len(value)}")
    return tuple(value)


def check_choice(name: str, value: object, literal: Any) -> None:
    """`value` is one of the Literal type `literal`'s values."""
    allowed = get_args(literal)
    if isinstance(value, (list, dict, set)) or value not in allowed:
        raise ValueError(f"{name}: {value!r} is not one of {list(allowed)}")


def check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: {value!r} must be true or false")


@dataclass
class TeacherState:
    """Everything a teacher's training loop needs to continue: completed epochs, the model,
    optimiser and scheduler state dicts, and the CPU generator state for shuffling/augmenting."""

    epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng_state: torch.Tensor


class TeacherTrainer:
    """Holds model, optimiser and schedule for one teacher; `state()`/`load()` round-trip."""

    def __init__(self, model: nn.Module, cfg: TeacherTrainConfig, steps_per_epoch: int, seed: int):
        self.model = model
        self.cfg = cfg
        self.steps_per_epoch = steps_per_epoch
        self.optimizer = make_optimizer(
            model.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum
        )
        self.scheduler = make_scheduler(
            self.optimizer,
            cfg.schedule,
            cfg.epochs * steps_per_epoch,
            cfg.warmup_epochs * steps_per_epoch,
            cfg.step_every_epochs * steps_per_epoch,
            cfg.gamma,
        )
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0

    def state(self) -> TeacherState:
        return TeacherState(
            self.epoch,
            {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            copy.deepcopy(self.optimizer.state_dict()),
            {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"},
            self.generator.get_state(),
        )

    def load(self, state: TeacherState) -> None:
        self.model.load_state_dict(state.model)
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict({**state.scheduler, "lr_lambdas": [None]})
        self.generator.set_state(state.rng_state)
        self.epoch = state.epoch

    def train_epoch(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """One epoch over (x, y) batches (x normalised, un-augmented): per-image random-resized
        crop + flip drawn from the trainer's generator, cross-entropy, SGD/AdamW step.
        Returns the mean training loss."""
        self.model.train()
        total: torch.Tensor | float = 0.0  # summed on the device: one sync per epoch
        count = 0
        for x, y in batches:
            boxes, flips = draw_crops(
                len(x), self.generator, (self.cfg.min_crop_scale, 1.0), self.cfg.flip
            )
            logits = self.model(apply_crops(x, boxes, flips))
            loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            total = total + loss.detach().double() * len(y)
            count += len(y)
        self.epoch += 1
        return float(total) / max(1, count)

    def shuffled_batches(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """In-memory data (small sets, tests, the demo): one shuffled pass, the permutation
        drawn from the trainer's generator so it is part of the resumable state."""
        perm = torch.randperm(len(images), generator=self.generator).to(images.device)
        for idx in perm.split(self.cfg.batch_size):
            yield images[idx], labels[idx]
