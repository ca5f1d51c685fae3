"""Distribution-matching losses.

`gaussian_kl` is Eq. 1 exactly as written: KL( N(mu_S, Sigma_S) || N(mu_T, Sigma_T) ) (only the
teacher-side inverse and log-determinant appear; the text's "D_KL(p_T || p_S)" is not what the
formula computes). The teacher side is prepared once per (teacher, layer): a Cholesky factor of
Sigma_T + ridge*I and its log-determinant. Each step then costs one Cholesky of the (small)
C x C batch covariance and triangular solves against the cached factor; no inverse is formed.
Layers with the same channel count are batched into one call.

Ablations (Table 4): the diagonal-covariance KL, and moment matching with an l2 distance as in
SRe2L/CDA's BatchNorm-statistics loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .stats import at_least_float32

__all__ = [
    "cholesky_with_ridge",
    "DEFAULT_RIDGE",
    "GaussianTarget",
    "TargetGroup",
    "diagonal_kl_layers",
    "gaussian_kl",
    "kl_layers",
    "kl_layers_unchecked",
    "label_loss",
    "moment_matching_layers",
    "prepare_target",
    "stack_targets",
]

DEFAULT_RIDGE = 1e-4


@dataclass(frozen=True)
class GaussianTarget:
    """Full-dataset Gaussian of one (teacher, layer), float64.

    mean: (C,); cov: (C, C) as measured; chol: (C, C) lower Cholesky factor of cov + ridge*I;
    logdet: () log|cov + ridge*I|.
    """

    mean: torch.Tensor
    cov: torch.Tensor
    chol: torch.Tensor
    logdet: torch.Tensor
    ridge: float

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def to(self, device: torch.device | str) -> GaussianTarget:
        return GaussianTarget(
            self.mean.to(device),
            self.cov.to(device),
            self.chol.to(device),
            self.logdet.to(device),
            self.ridge,
        )


def cholesky_with_ridge(cov: torch.Tensor, ridge: float) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor of cov + ridge*I; the ridge grows tenfold (up to 1e4 times) if the
    matrix is not numerically positive definite, so a 50-hour run does not die on one bad batch.
    Returns the factor and the ridge used."""
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    r = ridge
    for _ in range(5):
        chol, info = torch.linalg.cholesky_ex(cov + r * eye)
        if not bool((info != 0).any()):
            return chol, r
        r *= 10.0
    raise ValueError(
        f"covariance of shape {tuple(cov.shape)} is not positive definite "
        f"even with ridge {r / 10:g}"
    )


def prepare_target(
    mean: torch.Tensor, cov: torch.Tensor, ridge: float = DEFAULT_RIDGE
) -> GaussianTarget:
    """Cache what Eq. 1 needs of the teacher side: Cholesky factor and log-determinant.

    A ridge on Sigma_T is needed as well as on Sigma_S: a conv's output covariance has rank at
    most C_in*k*k (27 for a 3x3 RGB stem), so stems are often singular.
    """
    mean = mean.detach().double()
    cov = cov.detach().double()
    if cov.shape != (mean.shape[0], mean.shape[0]):
        raise ValueError(f"mean {tuple(mean.shape)} and covariance {tuple(cov.shape)} disagree")
    chol, used = cholesky_with_ridge(0.5 * (cov + cov.T), ridge)
    logdet = 2.0 * torch.log(torch.diagonal(chol)).sum()
    return GaussianTarget(mean, cov, chol, logdet, used)


def gaussian_kl(
    mean_s: torch.Tensor, cov_s: torch.Tensor, target: GaussianTarget, ridge: float | None = None
) -> torch.Tensor:
    """Eq. 1 for one layer: KL(N(mean_s, cov_s + ridge*I) || N(target)), float64 scalar.

    mean_s: (C,), cov_s: (C, C), differentiable. ridge defaults to the target's ridge.
    """
    return kl_layers([mean_s], [cov_s], [target], ridge)[0]


@dataclass(frozen=True)
class TargetGroup:
    """Targets of equal width stacked once for the batched Cholesky/solve of `kl_layers`.

    index: positions of the layers in the layer list; chol (G, C, C), mean (G, C), logdet (G,).
    """

    index: tuple[int, ...]
    chol: torch.Tensor
    mean: torch.Tensor
    logdet: torch.Tensor
    ridge: float

    @property
    def dim(self) -> int:
        return self.mean.shape[-1]


def stack_targets(targets: Sequence[GaussianTarget]) -> list[TargetGroup]:
    """Group layers by width and stack their cached factors (done once per teacher, not per
    step). Layers whose targets needed different ridges are grouped apart."""
    groups: dict[tuple[int, float], list[int]] = {}
    for i, t in enumerate(targets):
        groups.setdefault((t.dim, t.ridge), []).append(i)
    return [
        TargetGroup(
            tuple(idx),
            torch.stack([targets[i].chol for i in idx]),
            torch.stack([targets[i].mean for i in idx]),
            torch.stack([targets[i].logdet for i in idx]),
            ridge,
        )
        for (_, ridge), idx in groups.items()
    ]


def kl_layers(
    means: Sequence[torch.Tensor],
    covs: Sequence[torch.Tensor],
    targets: Sequence[GaussianTarget] | Sequence[TargetGroup],
    ridge: float | None = None,
    *,
    ridges_used: list[float] | None = None,
) -> torch.Tensor:
    """Eq. 1 per layer, (L,) float64. Layers of equal width share one batched Cholesky/solve.

    tr(Sigma_T^-1 Sigma_S) = ||L_T^-1 L_S||_F^2 and the Mahalanobis term ||L_T^-1 d||^2 come from
    one triangular solve against the cached factor L_T. `targets`: one GaussianTarget per layer,
    or their `stack_targets` groups (prepared once). A batch covariance that is not positive
    definite gets a tenfold larger ridge (up to 4 times): a host-device sync per width.

    ridges_used: a list the caller passes to learn the ridge each layer's batch covariance got;
    its contents are replaced by one float per layer (layers of a group share their group's):
    `ridge` (the target's where None) or the larger one escalation needed, as
    `cholesky_with_ridge` returned it. Free: the escalation's sync made it a host value.
    """
    kl, _, used = _kl_groups(means, covs, targets, ridge, check=True)
    if ridges_used is not None:
        ridges_used[:] = used
    return kl


def kl_layers_unchecked(
    means: Sequence[torch.Tensor],
    covs: Sequence[torch.Tensor],
    targets: Sequence[GaussianTarget] | Sequence[TargetGroup],
    ridge: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`kl_layers` without a host-device sync: (kl (L,), failed), failed a () bool tensor on
    the device, True if a batch Cholesky failed at `ridge`. Where it did, the KL is not to be
    used: the caller redoes the step with `kl_layers`, which escalates the ridge."""
    kl, failed, _ = _kl_groups(means, covs, targets, ridge, check=False)
    return kl, failed


def _kl_groups(
    means: Sequence[torch.Tensor],
    covs: Sequence[torch.Tensor],
    targets: Sequence[GaussianTarget] | Sequence[TargetGroup],
    ridge: float | None,
    check: bool,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """(kl (L,), failed (), ridge per layer). The ridges are those the batch Cholesky used with
    check=True; with check=False, the configured ones (whether they sufficed is `failed`)."""
    if targets and isinstance(targets[0], TargetGroup):
        groups = [g for g in targets if isinstance(g, TargetGroup)]
    else:
        groups = stack_targets([t for t in targets if isinstance(t, GaussianTarget)])
    if not (len(means) == len(covs) == sum(len(g.index) for g in groups)) or not means:
        raise ValueError("means, covs and targets must have one entry per layer")
    out: list[torch.Tensor | None] = [None] * len(means)
    used = [0.0] * len(means)
    failed = torch.zeros((), dtype=torch.bool, device=means[0].device)
    for g in groups:
        idx, dim = g.index, g.dim
        r = g.ridge if ridge is None else ridge
        mu_s = torch.stack([means[i] for i in idx]).double()  # (G, C)
        sig_s = torch.stack([covs[i] for i in idx]).double()  # (G, C, C)
        sym = 0.5 * (sig_s + sig_s.transpose(-1, -2))
        if check:
            chol_s, r = cholesky_with_ridge(sym, r)
        else:
            eye = torch.eye(dim, dtype=sym.dtype, device=sym.device)
            chol_s, info = torch.linalg.cholesky_ex(sym + r * eye)
            failed = failed | (info != 0).any()
        logdet_s = 2.0 * torch.log(torch.diagonal(chol_s, dim1=-2, dim2=-1)).sum(-1)
        rhs = torch.cat([chol_s, (g.mean - mu_s).unsqueeze(-1)], dim=-1)  # (G, C, C+1)
        sol = torch.linalg.solve_triangular(g.chol, rhs, upper=False)
        trace = sol[..., :dim].square().sum((-1, -2))
        maha = sol[..., dim].square().sum(-1)
        kl = 0.5 * (g.logdet - logdet_s + trace + maha - dim)
        for j, i in enumerate(idx):
            out[i] = kl[j]
            used[i] = r
    return torch.stack(out), failed, used  # type: ignore[arg-type]


def diagonal_kl_layers(
    means: Sequence[torch.Tensor],
    covs: Sequence[torch.Tensor],
    targets: Sequence[GaussianTarget],
    ridge: float | None = None,
) -> torch.Tensor:
    """Eq. 1 with both covariances replaced by their diagonals (Table 4, "KL, diagonal"), (L,)."""
    out = []
    for mu_s, sig_s, t in zip(means, covs, targets, strict=True):
        r = t.ridge if ridge is None else ridge
        var_s = torch.diagonal(sig_s).double() + r
        var_t = torch.diagonal(t.cov) + r
        d = t.mean - mu_s.double()
        out.append(
            0.5 * (torch.log(var_t) - torch.log(var_s) + var_s / var_t + d * d / var_t - 1).sum()
        )
    return torch.stack(out)


def moment_matching_layers(
    means: Sequence[torch.Tensor],
    covs: Sequence[torch.Tensor],
    target_means: Sequence[torch.Tensor],
    target_covs: Sequence[torch.Tensor],
    *,
    diagonal: bool = True,
    first_multiplier: float = 10.0,
) -> torch.Tensor:
    """SRe2L/CDA "BatchNorm statistics" loss, (L,): ||mu_S - mu_T||_2 + ||var_S - var_T||_2 per
    layer (diagonal=True), or the Frobenius distance of full covariances (Table 4, "BN loss,
    multivariate"). The first layer is weighted by `first_multiplier`, as SRe2L does.

    The targets may be a BatchNorm layer's running statistics or the full-dataset statistics.
    """
    out = []
    for i, (mu, sig, mu_t, sig_t) in enumerate(
        zip(means, covs, target_means, target_covs, strict=True)
    ):
        mu_t = mu_t.to(mu.dtype)
        if diagonal:
            sig_t = sig_t if sig_t.dim() == 1 else torch.diagonal(sig_t)
            dist = torch.linalg.vector_norm(torch.diagonal(sig) - sig_t.to(sig.dtype))
        else:
            dist = torch.linalg.matrix_norm(sig - sig_t.to(sig.dtype))
        w = first_multiplier if i == 0 else 1.0
        out.append(w * (torch.linalg.vector_norm(mu - mu_t) + dist))
    return torch.stack(out)


def label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The label-alignment term of Eq. 1: cross-entropy against the fixed one-hot targets
    (float32; float64 logits stay float64)."""
    return F.cross_entropy(at_least_float32(logits), labels)
