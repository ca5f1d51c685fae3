"""DD-Ranking's scores of an image set (Li et al. 2025, "DD-Ranking: Rethinking the Evaluation
of Dataset Distillation"; `ddranking` 0.2.0, ddranking/metrics/hard_label.py), from students'
held-out top-1 accuracies as fractions in [0, 1]:

- hard-label recovery HLR = acc(full training set, hard labels) - acc(set, hard labels): how much
  of the full data's accuracy the set fails to recover (lower is better);
- improvement over random IOR = acc(set) - acc(random real subset of the same size), both under
  the same protocol (higher is better);
- the label-robust score LRS = (e^a - e^-1) / (e - e^-1) with a = lam * IOR - (1 - lam) * HLR
  under the hard protocol, lam = 0.5; with fractions a lies in [-1, 1] and LRS in [0, 1]
  (ddranking 0.2.0 feeds percentage points into exp, so its LRS is unbounded: computed here
  from fractions, as its paper defines it).

Scores are computed per student seed s (the set's student s against the random subset's
student s, which starts from the same initial weights), then averaged: mean and sample std
over the seeds both have. The full-data reference pairs by seed too when it has as many
students; otherwise its mean stands for every seed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "LRS_LAMBDA",
    "Spread",
    "hard_label_recovery",
    "improvement_over_random",
    "label_robust_score",
    "paired_scores",
]

LRS_LAMBDA = 0.5  # DD-Ranking's default weight of IOR against HLR


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation over n values (std None for n = 1)."""

    mean: float
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("no values to average")
        std = statistics.stdev(values) if len(values) > 1 else None
        return cls(statistics.fmean(values), std, len(values))


def improvement_over_random(acc_set: float, acc_random: float) -> float:
    """IOR = acc(set) - acc(random subset), same protocol; fractions."""
    return acc_set - acc_random


def hard_label_recovery(acc_full: float, acc_set_hard: float) -> float:
    """HLR = acc(full data, hard) - acc(set, hard); fractions."""
    return acc_full - acc_set_hard


def label_robust_score(ior: float, hlr: float, lam: float = LRS_LAMBDA) -> float:
    """LRS = (e^a - e^-1) / (e - e^-1), a = lam * IOR - (1 - lam) * HLR (fractions)."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam: {lam} must be in [0, 1]")
    a = lam * ior - (1.0 - lam) * hlr
    return (math.exp(a) - math.exp(-1.0)) / (math.e - math.exp(-1.0))


def _pairs(a: Sequence[float], b: Sequence[float]) -> list[tuple[float, float]]:
    """Seed s of `a` with seed s of `b` where `b` has it, else with `b`'s mean."""
    if not a or not b:
        return []
    if len(b) >= len(a):
        return list(zip(a, b, strict=False))
    mean_b = statistics.fmean(b)
    return [(x, mean_b) for x in a]


def paired_scores(
    acc_set: Sequence[float],
    acc_random: Sequence[float] | None = None,
    acc_full: Sequence[float] | None = None,
    lam: float = LRS_LAMBDA,
) -> dict[str, Spread | None]:
    """Per-seed scores of one image set under one protocol, then their mean and spread.

    acc_set, acc_random: students' top-1 of the set and of the random real subset (seed
    order), giving "ior"; acc_full (hard protocol only: the full-data reference's students)
    gives "hlr", and with both, "lrs". A score whose inputs are missing is None."""
    ior = [improvement_over_random(s, r) for s, r in _pairs(acc_set, acc_random or [])]
    hlr = [hard_label_recovery(f, s) for s, f in _pairs(acc_set, acc_full or [])]
    lrs = [label_robust_score(i, h, lam) for i, h in zip(ior, hlr, strict=False)] if hlr else []
    return {
        "ior": Spread.of(ior) if ior else None,
        "hlr": Spread.of(hlr) if hlr else None,
        "lrs": Spread.of(lrs) if lrs else None,
    }
