"""Per-layer feature statistics (Sec. 4.1, App. A.1).

An activation (B, C, H, W) is B*H*W samples of dimension C. Full-dataset statistics are kept as
mergeable sufficient statistics in float64 (count, mean, centred second moment), combined with
Chan et al.'s parallel formula, so shards computed anywhere merge, in any order, to the result
of one pass. Batch statistics for synthesis are differentiable float32 tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch

from .precision import autocast_off

__all__ = [
    "Moments",
    "round_to_tf32",
    "SuffStats",
    "T",
    "as_samples",
    "at_least_float32",
    "batch_moments",
    "centred_gram",
    "merge_all",
    "merge_tree",
    "moments_grad",
]

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


T = TypeVar("T")


def merge_tree(parts: Iterable[T], merge: Callable[[T, T], T]) -> T:
    """Pairwise tree merge of `parts`, consumed one at a time: the same merges in the same
    order as merging neighbours level by level (the shape a Dask tree-reduce takes), holding
    only O(log n) partial results (a binary counter: two results of one level merge into the
    next), so merging 865 statistics shards of ImageNet-21K holds ~10, not 865."""
    stack: list[tuple[int, T]] = []
    for part in parts:
        level, cur = 0, part
        while stack and stack[-1][0] == level:
            cur = merge(stack.pop()[1], cur)
            level += 1
        stack.append((level, cur))
    if not stack:
        raise ValueError("nothing to merge")
    cur = stack.pop()[1]
    while stack:
        cur = merge(stack.pop()[1], cur)
    return cur


def merge_all(parts: Iterable[SuffStats]) -> SuffStats:
    """Pairwise tree merge (`merge_tree`)."""
    return merge_tree(parts, lambda a, b: a.merge(b))


CovMatmul = Literal["full", "tf32", "bf16"]


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 -> the nearest value with TF32's 10 mantissa bits (round half to even), still
    stored as float32: what a tensor core reads of an fp32 input in TF32 mode."""
    bits = x.contiguous().view(torch.int32)
    lsb = (bits >> 13) & 1
    rounded = (bits + 0xFFF + lsb) & ~0x1FFF
    return rounded.view(torch.float32).view_as(x)


def centred_gram(c: torch.Tensor, mode: CovMatmul = "full") -> torch.Tensor:
    """C^T C of centred samples c: (N, C) float32, accumulated in float32.

    mode "full": in c's own precision. "tf32" / "bf16": the inputs rounded to TF32 (10 mantissa
    bits) or bfloat16 (7), as the tensor cores read them, products accumulated in float32. On
    CUDA that is the tensor-core GEMM itself; elsewhere the rounding is applied and the GEMM
    run in float32, which computes the same products (those of 11- or 8-bit mantissas are
    exact in float32). Only centred samples may be rounded: the uncentred X^T X / n - mu mu^T
    cancels, and its rounding error would be relative to |mu|^2, not to the covariance.
    """
    if mode == "full":
        return c.T @ c
    if c.dtype != torch.float32:
        raise ValueError(f"reduced-precision covariance GEMM needs float32 samples, got {c.dtype}")
    if mode == "bf16":
        c16 = c.to(torch.bfloat16)
        if c.is_cuda:
            return torch.mm(c16.T, c16, out_dtype=torch.float32)
        r = c16.float()
        return r.T @ r
    if mode == "tf32":
        if c.is_cuda:
            before = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                return c.T @ c
            finally:
                torch.backends.cuda.matmul.allow_tf32 = before
        r = round_to_tf32(c)
        return r.T @ r
    raise ValueError(f"unknown covariance GEMM mode {mode!r}; expected 'full', 'tf32' or 'bf16'")


class Moments(torch.autograd.Function):
    """(mean, population covariance) of an activation with one GEMM forward and one backward.

    The activation is saved for backward in its own dtype (a bfloat16 activation stays bf16:
    no float32 copy is kept); forward and backward cast it to float32 transiently, one layer at
    a time. mode "full": the uncentred X^T X / n - mu mu^T in one GEMM (no centred copy);
    "tf32"/"bf16": the centred Gram on tensor cores (`centred_gram`).

    Backward: with D = (dSigma + dSigma^T) / n, dX = X D + 1 (dmu - n D mu)^T / n, computed in
    the activation's own memory layout, so that the gradient adds to BatchNorm's without a
    layout change (a layout mismatch there made the conv backward twice as slow).
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, mode: CovMatmul = "full"
    ) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        s = as_samples(at_least_float32(x))
        n = s.shape[0]
        mean = s.mean(0)
        if mode == "full":
            cov = torch.addmm(torch.outer(mean, mean), s.T, s, beta=-1.0, alpha=1.0 / n)
        else:
            cov = centred_gram(s - mean, mode) / n
        ctx.save_for_backward(x, mean)
        return mean, 0.5 * (cov + cov.T)

    @staticmethod
    def backward(ctx, dmean: torch.Tensor | None, dcov: torch.Tensor | None):  # type: ignore[override]
        x, mean = ctx.saved_tensors
        xf = at_least_float32(x)
        grad = moments_grad(xf, mean, x.numel() // mean.shape[0], dmean, dcov)
        return grad.to(x.dtype), None


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


def batch_moments(x: torch.Tensor, mode: CovMatmul = "full") -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable mean (C,) and population covariance (C, C) of an activation batch
    x: (B, C, H, W) or (N, C), in float32 (float64 stays float64) with autocast off
    (statistics never in bf16/fp16).

    mode "full": the second moment is formed uncentred, X^T X / n - mu mu^T, in one GEMM;
    "tf32"/"bf16": centred, on tensor cores (`centred_gram`). Either way no centred copy and no
    float32 copy of a bf16 activation is kept for backward.
    """
    with autocast_off(x.device.type):
        return Moments.apply(x, mode)
