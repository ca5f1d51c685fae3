"""Per-layer feature statistics (Sec. 4.1, App. A.1).

An activation (B, C, H, W) is B*H*W samples of dimension C. Full-dataset statistics are kept as
mergeable sufficient statistics in float64 (count, mean, centred second moment), combined with
Chan et al.'s parallel formula, so shards computed anywhere merge, in any order, to the result
of one pass. Batch statistics for synthesis are differentiable float32 tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Precision = Literal["float64", "mixed"]


def as_samples(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) activation -> (B*H*W, C) samples; (N, C) passes through.

    A view when `x` is channels_last, a copy otherwise.
    """
    if x.dim() == 4:
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    if x.dim() == 2:
        return x
    raise ValueError(f"expected a (B, C, H, W) or (N, C) tensor, got shape {tuple(x.shape)}")


@dataclass(frozen=True)
class SuffStats:
    """Sufficient statistics of n samples of dimension C, float64.

    n: sample count; mean: (C,); m2: (C, C) sum of outer products of centred samples.
    """

    n: int
    mean: torch.Tensor
    m2: torch.Tensor

    @staticmethod
    def empty(channels: int, device: torch.device | str = "cpu") -> SuffStats:
        z = torch.zeros(channels, dtype=torch.float64, device=device)
        return SuffStats(0, z, torch.zeros(channels, channels, dtype=torch.float64, device=device))

    @staticmethod
    def from_batch(x: torch.Tensor, precision: Precision = "mixed") -> SuffStats:
        """Statistics of one activation batch x: (B, C, H, W) or (N, C).

        precision "float64": everything in float64 (exact to ~1e-13, slower, very slow on
        consumer GPUs). "mixed": the batch is centred on its own mean and its second moment taken
        in float32, then held in float64; merging stays exact, so the error is that of one
        centred float32 batch (~1e-7 relative), not one that grows with the dataset.
        """
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            s = as_samples(x)
            s = s.double() if precision == "float64" else s.float()
            n = s.shape[0]
            mean = s.mean(0)
            centred = s - mean
            m2 = centred.T @ centred
            return SuffStats(n, mean.double(), m2.double())

    def merge(self, other: SuffStats) -> SuffStats:
        """Chan's parallel combination; exact in float64 up to rounding."""
        if self.n == 0:
            return other
        if other.n == 0:
            return self
        if self.mean.shape != other.mean.shape:
            raise ValueError(
                f"cannot merge statistics of {self.mean.shape[0]} and "
                f"{other.mean.shape[0]} channels"
            )
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + torch.outer(delta, delta) * (self.n * other.n / n)
        return SuffStats(n, mean, m2)

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu (C,), Sigma (C, C)): the population covariance m2 / n, float64."""
        if self.n == 0:
            raise ValueError("no samples: statistics are empty")
        cov = self.m2 / self.n
        return self.mean, 0.5 * (cov + cov.T)

    def to(self, device: torch.device | str) -> SuffStats:
        return SuffStats(self.n, self.mean.to(device), self.m2.to(device))


def merge_all(parts: list[SuffStats]) -> SuffStats:
    """Pairwise tree merge (the shape a Dask tree-reduce takes)."""
    if not parts:
        raise ValueError("nothing to merge")
    while len(parts) > 1:
        parts = [
            parts[i].merge(parts[i + 1]) if i + 1 < len(parts) else parts[i]
            for i in range(0, len(parts), 2)
        ]
    return parts[0]


class _Gram(torch.autograd.Function):
    """G = S^T S for S (N, C), with a one-matmul backward: dS = S (dG + dG^T).

    Autograd's generic matmul backward would do two (N, C) x (C, C) products, one per operand;
    here both operands are S, and that second product is a third of the layer's statistics
    cost in synthesis.
    """

    @staticmethod
    def forward(ctx, s: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(s)
        return s.T @ s

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (s,) = ctx.saved_tensors
        return s @ (grad + grad.T)


def gram(s: torch.Tensor) -> torch.Tensor:
    """S^T S, (C, C), differentiable with a single-matmul backward. s: (N, C)."""
    return _Gram.apply(s)


def batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable mean (C,) and population covariance (C, C) of an activation batch.

    Used inside the synthesis loss, in float32 (autocast off): the second moment is formed
    uncentred, X^T X / n - mu mu^T, so that under channels_last no copy of the activation is
    kept for backward beyond the one the network keeps already.
    """
    with torch.autocast(x.device.type, enabled=False):
        s = as_samples(x).float()
        n = s.shape[0]
        mean = s.mean(0)
        cov = gram(s) / n - torch.outer(mean, mean)
        return mean, 0.5 * (cov + cov.T)
