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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .loss import kl_layers
from .stats import SuffStats
from .synthesis import MeasuredTeacher

__all__ = [
    "SetMatch",
    "set_match",
]


@dataclass(frozen=True)
class SetMatch:
    """kl: (L,) float64, Eq. 1 per measured layer of the whole set against the targets;
    top1: fraction of images the teacher assigns to their class; confidence: mean softmax
    probability of that class; images: how many were measured."""

    kl: torch.Tensor
    top1: float
    confidence: float
    images: int


@torch.no_grad()
def set_match(
    teachers: Sequence[MeasuredTeacher],
    chunks: Iterable[tuple[torch.Tensor, torch.Tensor]],
    ridge: float | None = None,
) -> list[SetMatch]:
    """Match of an image set with each teacher's full-dataset Gaussians, one pass over the set.

    chunks: (images (B, C, H, W) in normalised space, classes (B,)) pieces of the set, on the
    teachers' device; the layer statistics of the pieces are merged exactly (float64), so the
    result does not depend on how the set is cut. `ridge`: as in the synthesis loss (default:
    each target's own). Returns one SetMatch per teacher."""
    stats: list[list[SuffStats] | None] = [None] * len(teachers)
    hits = [0.0] * len(teachers)
    conf = [0.0] * len(teachers)
    n = 0
    for x, y in chunks:
        if len(x) != len(y):
            raise ValueError(f"a chunk of {len(x)} images with {len(y)} classes")
        n += len(x)
        for m, teacher in enumerate(teachers):
            logits, acts = teacher(x)
            part = [SuffStats.from_batch(a, "float64") for a in acts]
            prev = stats[m]
            stats[m] = (
                part if prev is None else [s.merge(p) for s, p in zip(prev, part, strict=True)]
            )
            yy = y.to(logits.device).long()
            hits[m] += float((logits.argmax(1) == yy).sum())
            conf[m] += float(logits.double().softmax(1).gather(1, yy[:, None]).sum())
    if n == 0:
        raise ValueError("no images to measure")
    out = []
    for m, teacher in enumerate(teachers):
        mean_cov = [s.mean_cov() for s in stats[m]]  # type: ignore[union-attr]
        kl = kl_layers([u for u, _ in mean_cov], [c for _, c in mean_cov], teacher.targets, ridge)
        out.append(SetMatch(kl.cpu(), hits[m] / n, conf[m] / n, n))
    return out
