"""Ensemble soft labels per epoch with recorded augmentations (Alg. 2, Sec. 4.3, App. A.3).

Each epoch visits the distilled set in batches of a seeded permutation; every image gets a
random-resized-crop box and flip, drawn and recorded per image; its label is the mean of the M
teachers' logits on the augmented image (ENL, averaged in logit space). Every epoch depends only
on (run seed, epoch), so epochs can be labelled independently, in any order, anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .augment import apply_crops, draw_crops, quantise_boxes


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, epoch, stream, ...), independent per tuple."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Image indices of each batch of `epoch`: a seeded permutation of range(n), split."""
    g = torch.Generator().manual_seed(derive_seed(seed, epoch, 0))
    return list(torch.randperm(n, generator=g).split(batch_size))


@dataclass
class EpochLabels:
    """One labelled epoch, one row per (batch, position).

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

    def batches(self) -> list[torch.Tensor]:
        """Row indices of each batch, in batch order."""
        order = torch.argsort(self.batch * (int(self.position.max()) + 1) + self.position)
        counts = torch.bincount(self.batch[order]).tolist()
        return list(order.split([c for c in counts if c > 0]))


@torch.no_grad()
def ensemble_logits(teachers: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """(N, classes) mean of the teachers' logits (Alg. 2: added in logit space, divided by M)."""
    total = torch.zeros((), device=x.device)
    for t in teachers:
        total = total + t(x).float()
    return total / len(teachers)


@torch.no_grad()
def label_epoch(
    images: torch.Tensor,
    teachers: Sequence[nn.Module],
    epoch: int,
    seed: int,
    batch_size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    flip: bool = True,
) -> EpochLabels:
    """Label one epoch of the distilled set `images` (N, C, H, W), normalised space.

    Teachers must be in eval mode. Augmentations are drawn from a generator seeded by
    (seed, epoch), so the same call gives the same rows anywhere; boxes are quantised to the
    uint16 grid the label files store (`quantise_boxes`) before the teachers see the crops.
    """
    for t in teachers:
        if t.training:
            raise ValueError("teachers must be in eval mode for labelling")
    g = torch.Generator().manual_seed(derive_seed(seed, epoch, 1))
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("b", "p", "i", "box", "flip", "y")}
    for b, idx in enumerate(epoch_batches(len(images), batch_size, seed, epoch)):
        boxes, flips = draw_crops(len(idx), g, scale, flip)
        # Label the crop the file stores exactly (uint16 boxes), not one 1/131070 away from it.
        boxes = quantise_boxes(boxes)
        x = apply_crops(images[idx.to(images.device)], boxes, flips)
        rows["b"].append(torch.full((len(idx),), b, dtype=torch.int64))
        rows["p"].append(torch.arange(len(idx), dtype=torch.int64))
        rows["i"].append(idx)
        rows["box"].append(boxes)
        rows["flip"].append(flips)
        rows["y"].append(ensemble_logits(teachers, x).cpu())
    cat = {k: torch.cat(v) for k, v in rows.items()}
    return EpochLabels(epoch, cat["b"], cat["p"], cat["i"], cat["box"], cat["flip"], cat["y"])
