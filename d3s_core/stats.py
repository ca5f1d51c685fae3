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

from .precision import autocast_off

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
        dtype = torch.float64 if precision == "float64" else torch.float32
        with torch.no_grad(), autocast_off(x.device.type):
            if x.dim() == 4:
                # One pass for the mean, one that centres (and casts) straight into an (N, C)
                # buffer, one GEMM.
                b, c, h, w = x.shape
                mean = x.mean((0, 2, 3), dtype=dtype)
                buf = torch.empty((b, h, w, c), dtype=dtype, device=x.device)
                torch.sub(x, mean.view(1, c, 1, 1), out=buf.permute(0, 3, 1, 2))
                centred = buf.view(-1, c)
            else:
                s = as_samples(x).to(dtype)
                mean = s.mean(0)
                centred = s - mean
            m2 = centred.T @ centred
            return SuffStats(centred.shape[0], mean.double(), m2.double())

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


class _Moments(torch.autograd.Function):
    """(mean, population covariance) of an activation with one GEMM forward and one backward.

    Backward: with D = (dSigma + dSigma^T) / n, dX = X D + 1 (dmu - n D mu)^T / n, computed in
    the activation's own memory layout, so that the gradient adds to BatchNorm's without a
    layout change (a layout mismatch there made the conv backward twice as slow).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        s = as_samples(x)
        n = s.shape[0]
        mean = s.mean(0)
        cov = torch.addmm(torch.outer(mean, mean), s.T, s, beta=-1.0, alpha=1.0 / n)
        ctx.save_for_backward(x, mean)
        return mean, 0.5 * (cov + cov.T)

    @staticmethod
    def backward(ctx, dmean: torch.Tensor | None, dcov: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        x, mean = ctx.saved_tensors
        return moments_grad(x, mean, x.numel() // mean.shape[0], dmean, dcov)


def moments_grad(
    x: torch.Tensor,
    mean: torch.Tensor,
    n: int,
    dmean: torch.Tensor | None,
    dcov: torch.Tensor | None,
) -> torch.Tensor:
    """Gradient with respect to the rows of x of a loss on (mean, covariance) of n samples that
    include x's: dX = X D + 1 (dmu - n D mu)^T / n, D = (dSigma + dSigma^T) / n.

    x: (B, C, H, W) or (N, C); mean: (C,) of all n samples (n = x's own count in one process,
    the count over every rank in data-parallel synthesis). The result has x's memory layout.
    """
    c = mean.shape[0]
    d = torch.zeros(c, c, dtype=x.dtype, device=x.device) if dcov is None else (dcov + dcov.T) / n
    shift = -(d @ mean)
    if dmean is not None:
        shift = shift + dmean / n
    if x.dim() == 4 and x.is_contiguous():  # NCHW: (C, C) @ (B, C, HW), written NCHW
        b, _, h, w = x.shape
        return torch.matmul(d, x.view(b, c, h * w)).add_(shift.view(1, c, 1)).view(b, c, h, w)
    g = torch.addmm(shift, as_samples(x), d)
    if x.dim() == 4:  # channels_last: the (N, C) view is the activation's own layout
        b, _, h, w = x.shape
        return g.view(b, h, w, c).permute(0, 3, 1, 2)
    return g


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, unless it is float64 (a float64 run stays float64)."""
    return x if x.dtype == torch.float64 else x.float()


def batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable mean (C,) and population covariance (C, C) of an activation batch
    x: (B, C, H, W) or (N, C), in float32 (float64 stays float64) with autocast off
    (statistics never in bf16/fp16).

    The second moment is formed uncentred, X^T X / n - mu mu^T, in one GEMM: no centred copy
    of the activation is kept for backward.
    """
    with autocast_off(x.device.type):
        return _Moments.apply(at_least_float32(x))
