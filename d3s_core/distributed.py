"""Data-parallel synthesis inside one batch: each rank holds a contiguous slice of the batch's
rows, and what the loss needs of the whole batch is summed across ranks with one all-reduce.

Eq. 1 needs, per measured layer, the batch mean and covariance; they follow from sufficient
statistics that add across ranks (sample count, sum, sum of outer products), reduced in float64.
The label term needs the cross-entropy summed over the whole batch and the batch size.

Every rank then computes the same loss from the same reduced numbers, so the gradient of that
loss with respect to a rank's own rows is the single-process gradient for those rows: the
backward of the reduce is the identity on the rank's own contribution. (`torch.distributed.nn`'s
all_reduce instead all-reduces the gradients, which here would multiply them by the world size.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .precision import autocast_off
from .stats import CovMatmul, as_samples, at_least_float32, centred_gram, moments_grad

__all__ = [
    "World",
    "gather_rows",
    "label_loss_across",
    "moments_across",
    "sum_across",
]


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel group: rank in [0, size), and the
    torch.distributed process group (None: the default group)."""

    rank: int
    size: int
    group: Any = None

    @staticmethod
    def current(group: Any = None) -> World | None:
        """The initialised process group as a World; None without one or with one process."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        size = dist.get_world_size(group)
        return World(dist.get_rank(group), size, group) if size > 1 else None

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes checkpoints and artifacts; the others only read."""
        return self.rank == 0

    def sizes(self, n: int) -> list[int]:
        """Rows of an n-row batch on each rank: contiguous blocks, the first n % size ranks one
        row longer (torch.tensor_split's rule)."""
        if n < self.size:
            raise ValueError(f"a batch of {n} images cannot be split over {self.size} ranks")
        base, extra = divmod(n, self.size)
        return [base + (r < extra) for r in range(self.size)]

    def rows(self, n: int) -> slice:
        """This rank's rows of an n-row batch."""
        sizes = self.sizes(n)
        start = sum(sizes[: self.rank])
        return slice(start, start + sizes[self.rank])

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def agree(self, flag: bool) -> bool:
        """Rank 0's `flag` on every rank (for decisions taken from a clock, which ranks would
        otherwise take differently before a collective that all of them must join)."""
        box = [bool(flag)]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return bool(box[0])


class _SumAcross(torch.autograd.Function):
    """all_reduce(SUM) forward; identity backward (the loss is the same function of the sum on
    every rank, so each rank's share of the gradient is its own upstream gradient)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        out = t.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def sum_across(t: torch.Tensor, world: World) -> torch.Tensor:
    """Differentiable sum of `t` over all ranks (same shape on every rank)."""
    return _SumAcross.apply(t, world.group)


def _centred_samples(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (C,), centred samples (N, C)) of x: (B, C, H, W) or (N, C); for NCHW input the
    centring and the layout change are one pass (as `SuffStats.from_batch`)."""
    if x.dim() == 4:
        b, c, h, w = x.shape
        mean = x.mean((0, 2, 3))
        buf = torch.empty((b, h, w, c), dtype=x.dtype, device=x.device)
        torch.sub(x, mean.view(1, c, 1, 1), out=buf.permute(0, 3, 1, 2))
        return mean, buf.view(-1, c)
    s = as_samples(x)
    mean = s.mean(0)
    return mean, s - mean


class _MomentsAcross(torch.autograd.Function):
    """(mean, population covariance) of several activations over the rows of every rank.

    Forward: per activation, the local count n_r, sum and second moment about zero, packed into
    one float64 buffer and all-reduced once, then centred in float64. The local second moment
    is the centred Gram C^T C (one GEMM in the activation's dtype) plus n_r mu_r mu_r^T in
    float64, so no float32 cancellation against a large mean. Backward: the single-process
    formula (`moments_grad`) with the global count and mean, no communication.
    Outputs are mean_0, cov_0, mean_1, cov_1, ... in the activations' dtype.
    """

    @staticmethod
    def forward(
        ctx, group: Any, total_rows: int | None, mode: CovMatmul, *xs: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        parts = []
        for x in xs:
            mean, centred = _centred_samples(x)
            n = centred.shape[0]
            mu = mean.double()
            parts += [
                torch.full((1,), float(n), dtype=torch.float64, device=x.device),
                mu * n,
                (centred_gram(centred, mode).double() + torch.outer(mu, mu) * n).flatten(),
            ]
        buf = torch.cat(parts)
        dist.all_reduce(buf, group=group)
        out: list[torch.Tensor] = []
        means: list[torch.Tensor] = []
        starts = []
        offset = 0
        for x in xs:
            c = x.shape[1]
            starts.append(offset)
            total = buf[offset]
            mean = buf[offset + 1 : offset + 1 + c] / total
            second = buf[offset + 1 + c : offset + 1 + c + c * c].view(c, c) / total
            offset += 1 + c + c * c
            cov = second - torch.outer(mean, mean)
            means.append(mean.to(x.dtype))
            out += [means[-1], (0.5 * (cov + cov.T)).to(x.dtype)]
        if total_rows is not None:  # samples per row times rows: no device sync
            counts = [total_rows * (x[0].numel() // x.shape[1]) for x in xs]
        else:
            counts = [int(v) for v in buf[starts].tolist()]  # one device sync for all layers
        ctx.save_for_backward(*xs, *means)
        ctx.counts = counts
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        saved = ctx.saved_tensors
        k = len(saved) // 2
        dxs: list[torch.Tensor | None] = []
        for i in range(k):
            dmean, dcov = grads[2 * i], grads[2 * i + 1]
            if not ctx.needs_input_grad[3 + i] or (dmean is None and dcov is None):
                dxs.append(None)
                continue
            dxs.append(moments_grad(saved[i], saved[k + i], ctx.counts[i], dmean, dcov))
        return (None, None, None, *dxs)


def moments_across(
    xs: Sequence[torch.Tensor],
    world: World,
    total_rows: int | None = None,
    cov_matmul: CovMatmul = "full",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Differentiable (mean (C,), population covariance (C, C)) of each activation over the
    whole batch, this rank holding rows `world.rows(B)` of it.

    xs: one (B_r, C, H, W) or (N_r, C) activation per layer. float64 stays float64; anything
    else is computed in float32 with autocast off, like `batch_moments`. One all-reduce for all
    layers. The gradient to each rank's rows equals the single-process gradient for them.
    total_rows: the whole batch's rows (B over all ranks), if known: the sample counts then
    need no host-device sync.
    """
    if not xs:
        return []
    device = xs[0].device
    with autocast_off(device.type):
        xs = [at_least_float32(x) for x in xs]
        out = _MomentsAcross.apply(world.group, total_rows, cov_matmul, *xs)
    return [(out[2 * i], out[2 * i + 1]) for i in range(len(xs))]


def label_loss_across(logits: torch.Tensor, labels: torch.Tensor, world: World) -> torch.Tensor:
    """Eq. 1's cross-entropy averaged over the whole batch: this rank's sum, summed over ranks,
    over the global batch size (not the mean of per-rank means, which weights uneven shards
    wrongly). logits: (B_r, classes); labels: (B_r,)."""
    local = F.cross_entropy(at_least_float32(logits), labels, reduction="sum")
    count = torch.tensor(float(len(labels)), device=local.device, dtype=local.dtype)
    total = sum_across(torch.stack([local, count]), world)
    return total[0] / total[1]


def gather_rows(t: torch.Tensor, world: World, n: int, dst: int = 0) -> torch.Tensor | None:
    """The whole n-row tensor on rank `dst` from every rank's rows `world.rows(n)` (None on the
    other ranks). Shards are padded to equal length for the collective."""
    sizes = world.sizes(n)
    if t.shape[0] != sizes[world.rank]:
        raise ValueError(f"rank {world.rank} holds {t.shape[0]} rows, expected {sizes[world.rank]}")
    longest = max(sizes)
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes] if world.rank == dst else None
    dist.gather(padded, parts, group=world.group, group_dst=dst)
    if parts is None:
        return None
    return torch.cat([p[:k] for p, k in zip(parts, sizes, strict=True)])
