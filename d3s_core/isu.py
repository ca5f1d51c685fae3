"""Incremental statistic updating (ISU, Sec. 4.2, Eq. 2, Alg. 3) and teacher choice (ENS, Sec. 4.4).

Running distilled-set statistics per (teacher, layer) start at 0. While batch b (1-indexed,
counted over the whole distilled set) is optimised, the loss sees

    mu_hat = mu_batch / b + (1 - 1/b) * mu_running        (same for Sigma)

and after the batch the running statistics of *every* teacher become that mix, computed on the
finished images. Mixing centred covariances this way drops the between-batch mean shift; the
"exact" mode mixes first and second raw moments with sample-count weights and centres after, so
the running statistics equal the pooled statistics of all batches seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "RunningStats",
    "isu_mix",
    "isu_weight",
    "teacher_for_batch",
]

IsuMode = Literal["off", "paper", "exact"]
TeacherChoice = Literal["per_batch", "per_iteration", "single"]


def isu_weight(mode: IsuMode, batch_index: int, images_seen: int, batch_images: int) -> float:
    """Weight of the current batch in the mix: 1/b (Eq. 2) or its share of the samples (exact).

    batch_index: b, 1-indexed; images_seen: images in batches 1..b-1; batch_images: |B| now.
    """
    if batch_index < 1:
        raise ValueError(f"batch index is 1-indexed, got {batch_index}")
    if mode == "off":
        return 1.0
    if mode == "paper":
        return 1.0 / batch_index
    if mode == "exact":
        return batch_images / (images_seen + batch_images)
    raise ValueError(f"unknown ISU mode {mode!r}; expected 'off', 'paper' or 'exact'")


def isu_mix(
    batch_mean: torch.Tensor,
    batch_cov: torch.Tensor,
    run_mean: torch.Tensor,
    run_cov: torch.Tensor,
    weight: float,
    mode: IsuMode,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix batch statistics (differentiable) with running ones, float64.

    mode "paper": Eq. 2 on (mu, Sigma). "exact": mixes mu and E[z z^T] = Sigma + mu mu^T, then
    centres. "off": the batch statistics alone.
    """
    bm, bc = batch_mean.double(), batch_cov.double()
    if mode == "off" or weight == 1.0:
        return bm, bc
    w = weight
    mean = w * bm + (1 - w) * run_mean
    if mode == "paper":
        return mean, w * bc + (1 - w) * run_cov
    if mode == "exact":
        second = w * (bc + torch.outer(bm, bm)) + (1 - w) * (
            run_cov + torch.outer(run_mean, run_mean)
        )
        return mean, second - torch.outer(mean, mean)
    raise ValueError(f"unknown ISU mode {mode!r}")


@dataclass
class RunningStats:
    """ISU state for all teachers: means[m][l] (C_l,), covs[m][l] (C_l, C_l) float64, and the
    number of finished batches and images mixed in so far."""

    means: list[list[torch.Tensor]]
    covs: list[list[torch.Tensor]]
    batches_done: int = 0
    images_done: int = 0

    @staticmethod
    def zeros(channels: list[list[int]], device: torch.device | str = "cpu") -> RunningStats:
        """channels[m][l]: width of layer l of teacher m. All statistics start at 0 (Alg. 3)."""
        f64 = torch.float64
        return RunningStats(
            [[torch.zeros(c, dtype=f64, device=device) for c in ch] for ch in channels],
            [[torch.zeros(c, c, dtype=f64, device=device) for c in ch] for ch in channels],
        )

    def to(self, device: torch.device | str) -> RunningStats:
        """The same statistics on `device` (they meet the batch statistics there)."""
        return RunningStats(
            [[t.to(device) for t in ts] for ts in self.means],
            [[t.to(device) for t in ts] for ts in self.covs],
            self.batches_done,
            self.images_done,
        )

    @property
    def device(self) -> torch.device | None:
        """Where the statistics live (None without any)."""
        for ts in self.means:
            for t in ts:
                return t.device
        return None

    def updated(
        self,
        batch_stats: list[list[tuple[torch.Tensor, torch.Tensor]]],
        batch_images: int,
        mode: IsuMode,
    ) -> RunningStats:
        """After batch b: every teacher's running statistics become the Eq. 2 mix computed on
        the finished images. batch_stats[m][l] = (mean, cov) of the finished batch."""
        b = self.batches_done + 1
        w = isu_weight(mode, b, self.images_done, batch_images)
        means, covs = [], []
        for m, per_layer in enumerate(batch_stats):
            mixed = [
                isu_mix(bm.detach(), bc.detach(), self.means[m][l], self.covs[m][l], w, mode)
                for l, (bm, bc) in enumerate(per_layer)
            ]
            means.append([mu for mu, _ in mixed])
            covs.append([sig for _, sig in mixed])
        return RunningStats(means, covs, b, self.images_done + batch_images)


def teacher_for_batch(batch_index: int, num_teachers: int, choice: TeacherChoice) -> int | None:
    """ENS teacher of batch b (1-indexed): m = b mod M (Alg. 3, 0-indexed teachers), 0 for
    "single", None for "per_iteration" (drawn every step instead)."""
    if choice == "per_batch":
        return batch_index % num_teachers
    if choice == "single":
        return 0
    if choice == "per_iteration":
        return None
    raise ValueError(f"unknown teacher choice {choice!r}")
