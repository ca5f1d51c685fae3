"""Ensemble soft labels per epoch with recorded augmentations (Alg. 2, Sec. 4.3, App. A.3).

Each epoch visits the distilled set in batches of a seeded permutation; every image gets a
random-resized-crop box and flip, drawn and recorded per image; its label is the mean of the M
teachers' logits on the augmented image (ENL, averaged in logit space). Every epoch depends only
on (run seed, epoch), so epochs can be labelled independently, in any order, anywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .augment import apply_crops, draw_crops, quantise_boxes

__all__ = [
    "EpochLabels",
    "batch_rows",
    "derive_seed",
    "ensemble_logits",
    "epoch_batches",
    "label_batches",
    "label_epoch",
]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, epoch, stream, ...), independent per tuple."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Image indices of each batch of `epoch`: a seeded permutation of range(n), split."""
    g = torch.Generator().manual_seed(derive_seed(seed, epoch, 0))
    return list(torch.randperm(n, generator=g).split(batch_size))


def batch_rows(batch: torch.Tensor, position: torch.Tensor) -> list[torch.Tensor]:
    """Row indices of each batch, in batch order, each in position order.

    batch, position: (N,) int64, each (batch, position) pair once."""
    if not len(batch):
        return []
    order = torch.argsort(batch * (int(position.max()) + 1) + position)
    counts = torch.bincount(batch[order]).tolist()
    return list(order.split([c for c in counts if c > 0]))


@dataclass
class EpochLabels:
    """Labelled rows of one epoch (all of it, or some of its batches), one row per
    (batch, position).

    batch, position: (N,) int64; image_index: (N,) int64 into the distilled set;
    boxes: (N, 4) float32 [x0, y0, x1, y1] in [0, 1] (from `label_epoch`: on the uint16 grid,
    `quantise_boxes`); flips: (N,) bool;
    logits: (N, classes) float32, the ensemble mean.
    """

    epoch: int
    batch: torch.Tensor
    position: torch.Tensor
    image_index: torch.Tensor
    boxes: torch.Tensor
    flips: torch.Tensor
    logits: torch.Tensor

    def __len__(self) -> int:
        return len(self.batch)

    def batches(self) -> list[torch.Tensor]:
        """Row indices of each batch, in batch order."""
        return batch_rows(self.batch, self.position)

    def select(self, rows: torch.Tensor | slice) -> EpochLabels:
        """The rows `rows` (indices or a slice), in that order."""
        return EpochLabels(
            self.epoch,
            self.batch[rows],
            self.position[rows],
            self.image_index[rows],
            self.boxes[rows],
            self.flips[rows],
            self.logits[rows],
        )

    @staticmethod
    def cat(parts: Sequence[EpochLabels]) -> EpochLabels:
        """The rows of `parts` (of one epoch), one after the other."""
        if not parts:
            raise ValueError("no labelled rows to concatenate")
        return EpochLabels(
            parts[0].epoch,
            *(torch.cat([getattr(p, f) for p in parts]) for f in _ROW_FIELDS),
        )


_ROW_FIELDS = ("batch", "position", "image_index", "boxes", "flips", "logits")


@torch.no_grad()
def ensemble_logits(teachers: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """(N, classes) mean of the teachers' logits (Alg. 2: added in logit space, divided by M)."""
    total = torch.zeros((), device=x.device)
    for t in teachers:
        total = total + t(x).float()
    return total / len(teachers)


def label_batches(
    n: int,
    image_batches: Iterable[torch.Tensor],
    teachers: Sequence[nn.Module],
    epoch: int,
    seed: int,
    batch_size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    flip: bool = True,
) -> Iterator[EpochLabels]:
    """Label epoch `epoch` of a distilled set of `n` images one batch at a time.

    image_batches: for each batch of `epoch_batches(n, batch_size, seed, epoch)`, in order, the
    (B, C, H, W) images of its rows in the batch's index order (normalised space, on the
    teachers' device). Yields one EpochLabels per batch (logits on the CPU): together, row for
    row and bit for bit, what `label_epoch` gives for the whole set, since the crops are drawn
    from the same generator in the same batch order. Teachers must be in eval mode.
    """
    for t in teachers:
        if t.training:
            raise ValueError("teachers must be in eval mode for labelling")
    return _label_batches(n, image_batches, teachers, epoch, seed, batch_size, scale, flip)


@torch.no_grad()
def _label_batches(
    n: int,
    image_batches: Iterable[torch.Tensor],
    teachers: Sequence[nn.Module],
    epoch: int,
    seed: int,
    batch_size: int,
    scale: tuple[float, float],
    flip: bool,
) -> Iterator[EpochLabels]:
    g = torch.Generator().manual_seed(derive_seed(seed, epoch, 1))
    batches = epoch_batches(n, batch_size, seed, epoch)
    for b, (idx, images) in enumerate(zip(batches, image_batches, strict=True)):
        if len(images) != len(idx):
            raise ValueError(
                f"batch {b} of epoch {epoch}: {len(images)} images for {len(idx)} rows"
            )
        boxes, flips = draw_crops(len(idx), g, scale, flip)
        # Label the crop the file stores exactly (uint16 boxes), not one 1/131070 away from it.
        boxes = quantise_boxes(boxes)
        x = apply_crops(images, boxes, flips)
        yield EpochLabels(
            epoch,
            torch.full((len(idx),), b, dtype=torch.int64),
            torch.arange(len(idx), dtype=torch.int64),
            idx,
            boxes,
            flips,
            ensemble_logits(teachers, x).cpu(),
        )


def label_epoch(
    images: torch.Tensor,
    teachers: Sequence[nn.Module],
    epoch: int,
    seed: int,
    batch_size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    flip: bool = True,
) -> EpochLabels:
    """Label one epoch of the distilled set `images` (N, C, H, W), normalised space, held whole
    (small sets and tests; the stages stream the rows of each batch into `label_batches`).

    Teachers must be in eval mode. Augmentations are drawn from a generator seeded by
    (seed, epoch), so the same call gives the same rows anywhere; boxes are quantised to the
    uint16 grid the label files store (`quantise_boxes`) before the teachers see the crops.
    """
    n = len(images)
    rows = (images[idx.to(images.device)] for idx in epoch_batches(n, batch_size, seed, epoch))
    return EpochLabels.cat(
        list(label_batches(n, rows, teachers, epoch, seed, batch_size, scale, flip))
    )
