"""How well an image set matches the full-dataset statistics: the diagnostic behind a study.

D3S optimises each batch to make its feature Gaussians match the full dataset's (Eq. 1) and
the teacher's prediction match the target class (the alpha * CE term). `set_match` measures
both on a finished set as a whole, with no augmentation: Eq. 1 of the whole set's Gaussians
(statistics merged in float64 over chunks) against the teacher's full-dataset targets, layer by
layer, and the teacher's top-1 and mean probability of the set's own class. A random real subset
of the same size measured the same way is the yardstick: the KL of a finite sample of real
images is not 0, and a distilled set above it has not reached what real images give for free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .loss import kl_layers
from .stats import SuffStats
from .synthesis import MeasuredTeacher


@dataclass(frozen=True)
class SetMatch:
    """kl: (L,) float64, Eq. 1 per measured layer of the whole set against the targets;
    top1: fraction of images the teacher assigns to their class; confidence: mean softmax
    probability of that class."""

    kl: torch.Tensor
    top1: float
    confidence: float


@torch.no_grad()
def set_match(
    teacher: MeasuredTeacher,
    images: torch.Tensor,
    classes: torch.Tensor,
    chunk: int = 256,
    ridge: float | None = None,
) -> SetMatch:
    """Match of `images` (N, C, H, W), normalised space, with their `classes` (N,) to one
    teacher's full-dataset Gaussians. `chunk` images go through the teacher at a time; the
    layer statistics of the chunks are merged exactly (float64), so the result does not depend
    on it. `ridge`: as in the synthesis loss (default: each target's own)."""
    if len(images) != len(classes):
        raise ValueError(f"{len(images)} images but {len(classes)} classes")
    if len(images) == 0:
        raise ValueError("no images to measure")
    stats: list[SuffStats] | None = None
    hits, conf = 0.0, 0.0
    for x, y in zip(images.split(chunk), classes.split(chunk), strict=True):
        logits, acts = teacher(x)
        part = [SuffStats.from_batch(a, "float64") for a in acts]
        stats = part if stats is None else [s.merge(p) for s, p in zip(stats, part, strict=True)]
        y = y.to(logits.device).long()
        hits += float((logits.argmax(1) == y).sum())
        conf += float(logits.double().softmax(1).gather(1, y[:, None]).sum())
    assert stats is not None
    mean_cov = [s.mean_cov() for s in stats]
    kl = kl_layers([m for m, _ in mean_cov], [c for _, c in mean_cov], teacher.targets, ridge)
    return SetMatch(kl.cpu(), hits / len(images), conf / len(images))
