"""Supervised teacher training with explicit state for resume (Table 8).

The whole loop state (weights, optimiser and schedule state, epoch, RNG) is `TeacherState`,
plain tensors and numbers, so a run continues from a saved state exactly as if it had not
stopped. Data arrives as batches of tensors; where they come from is the caller's business.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .augment import apply_crops, draw_crops
from .optim import OptimizerName, ScheduleName, make_optimizer, make_scheduler

__all__ = ["TeacherState", "TeacherTrainConfig", "TeacherTrainer"]


@dataclass(frozen=True)
class TeacherTrainConfig:
    """Teacher recipe (Table 8). warmup/step_every are in epochs. Checks nothing: a config's
    values are checked by its typed section (storage/recipes.py) before they get here."""

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
