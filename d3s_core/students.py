"""Validation students trained by knowledge distillation on the labelled epochs (Alg. 4,
App. A.4, D.4, D.7, Table 10)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .augment import apply_crops, draw_crops
from .labelling import EpochLabels

__all__ = [
    "epoch_schedule",
    "evaluate_top1",
    "kd_loss",
    "train_hard_batches",
    "train_student_batches",
    "train_student_epoch",
]


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 20.0
) -> torch.Tensor:
    """Alg. 4: T^2 * KL(softmax(Y/T) || softmax(Y_hat/T)), averaged over the batch.

    teacher_logits Y: (N, classes) stored ensemble labels; student_logits Y_hat: (N, classes).
    """
    t = temperature
    log_p = F.log_softmax(teacher_logits.float() / t, dim=1)
    log_q = F.log_softmax(student_logits.float() / t, dim=1)
    pointwise = F.kl_div(log_q, log_p, reduction="none", log_target=True)
    # A class with zero target mass (top-k labels read without their tail) adds 0 log 0 = 0,
    # not exp(-inf) * (-inf - log q) = NaN.
    pointwise = pointwise.masked_fill(torch.isneginf(log_p), 0.0)
    return t * t * pointwise.sum() / student_logits.shape[0]


def epoch_schedule(label_epochs: int, train_epochs: int, generator: torch.Generator) -> list[int]:
    """Which labelled epoch each training epoch replays (App. D.7).

    A random permutation of the labelled epochs; when training is longer, fresh permutations
    are concatenated; when shorter, the first `train_epochs` of the permutation are used.
    """
    if label_epochs < 1 or train_epochs < 0:
        raise ValueError(
            f"need label_epochs >= 1 and train_epochs >= 0, got {label_epochs} and {train_epochs}"
        )
    order: list[int] = []
    while len(order) < train_epochs:
        order += torch.randperm(label_epochs, generator=generator).tolist()
    return order[:train_epochs]


def train_student_batches(
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[torch.Tensor, EpochLabels]],
    temperature: float = 20.0,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> float:
    """One epoch of Alg. 4, one label batch at a time: each step replays a batch's recorded
    crops and flips on its images and fits the recorded ensemble logits.

    batches: (images, labels) per label batch, in the epoch's batch order; images (B, C, H, W)
    are the rows `labels.image_index` in that order, on the student's device; labels one
    batch's rows in position order (`EpochLabels.batches`). Returns the mean loss (summed on
    the device: one host-device sync per epoch, not per batch)."""
    student.train()
    device = next(student.parameters()).device
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for images, labels in batches:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images for a label batch of {len(labels)} rows")
        x = apply_crops(images, labels.boxes, labels.flips)
        loss = kd_loss(student(x), labels.logits.to(device), temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += loss.detach().double() * len(labels)
        count += len(labels)
    return float(total) / max(1, count)


def train_hard_batches(
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    generator: torch.Generator,
    min_crop_scale: float,
    flip: bool,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> float:
    """One epoch of the hard-label protocol (DD-Ranking's HLR setting): each batch of images
    (B, C, H, W) on the student's device with their classes (B,) is augmented by the same
    random-resized-crop and flip as the soft protocol's labels (`draw_crops` with area in
    [min_crop_scale, 1], drawn from the CPU `generator`, so a seed replays the epoch on every
    device) and fitted by cross-entropy to the class labels. Returns the mean loss (one
    host-device sync per epoch)."""
    student.train()
    device = next(student.parameters()).device
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for images, classes in batches:
        if len(images) != len(classes):
            raise ValueError(f"{len(images)} images for {len(classes)} class labels")
        boxes, flips = draw_crops(len(images), generator, (min_crop_scale, 1.0), flip)
        x = apply_crops(images, boxes.to(images.device), flips.to(images.device))
        loss = F.cross_entropy(student(x), classes.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += loss.detach().double() * len(images)
        count += len(images)
    return float(total) / max(1, count)


def train_student_epoch(
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: EpochLabels,
    temperature: float = 20.0,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> float:
    """One epoch of Alg. 4 on a whole image set (N, C, H, W) and a whole labelled epoch held in
    memory (small sets and tests; the validation stage streams: `train_student_batches`).
    Batches in their recorded order, each image augmented from its recorded box and flip, loss
    against the recorded ensemble logits. Returns the mean loss."""
    device = images.device
    batches = (
        (images[labels.image_index[rows].to(device)], labels.select(rows))
        for rows in labels.batches()
    )
    return train_student_batches(student, optimizer, batches, temperature, scheduler)


@torch.no_grad()
def evaluate_top1(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512
) -> float:
    """Top-1 accuracy in [0, 1] of `model` on images (N, C, H, W) with classes (N,)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=images.device)
    for i in range(0, len(images), batch_size):
        pred = model(images[i : i + batch_size]).argmax(1)
        correct += (pred == labels[i : i + batch_size].to(pred.device)).sum()
    model.train(was_training)
    return int(correct) / max(1, len(images))  # one host-device sync
