"""Coreset selection of real images in a teacher's feature space: herding and k-center greedy,
the classic real-image baselines of dataset distillation (DC, Zhao et al. 2021; DM, Zhao &
Bilen 2023), each choosing k of one class's n samples from their (n, D) features."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["herding", "k_center_greedy", "penultimate_features"]


def _last_linear(model: nn.Module) -> nn.Linear:
    """The model's last registered `nn.Linear`: the classifier of torchvision ResNets (`fc`),
    `SmallResNet` and timm models (`head` / `head.fc` / `classifier`)."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to take features of")
    return last


def penultimate_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, D) float32 features of images `x`: (B, C, H, W) in normalised space, the input of
    the model's last `nn.Linear` (the pooled features before the classifier), captured by a
    forward pre-hook. Computed in eval mode (BatchNorm running statistics, so each sample's
    features do not depend on its batch) under no_grad; the model's mode is restored."""
    head = _last_linear(model)
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        hook.remove()
        model.train(was_training)
    if not captured:
        raise ValueError(f"{type(model).__name__}: its last nn.Linear was not called")
    f = captured[-1]
    if f.ndim != 2 or len(f) != len(x):
        raise ValueError(
            f"{type(model).__name__}: the last nn.Linear's input is {tuple(f.shape)}, "
            f"not (B={len(x)}, D) pooled features"
        )
    return f.float()


def _check_k(features: torch.Tensor, k: int) -> None:
    if features.ndim != 2:
        raise ValueError(f"features must be (n, D), got {tuple(features.shape)}")
    n = len(features)
    if not 0 <= k <= n:
        raise ValueError(f"cannot select k={k} of n={n} samples")


def herding(features: torch.Tensor, k: int) -> torch.Tensor:
    """(k,) int64 indices into `features` (n, D), distinct, in selection order: herding
    (Welling, "Herding dynamical weights to learn", ICML 2009; as used for coresets by Chen,
    Welling & Smola, UAI 2010, and by iCaRL, Rebuffi et al. 2017, Alg. 4). With mu the mean of
    all n features and S the sum of the t - 1 already selected, step t picks

        argmin over unselected i of || mu - (S + f_i) / t ||

    so that the running mean of the selection tracks mu. Float64 throughout; ties go to the
    lowest index. Memory O(n) beyond a float64 copy of the features: the squared norm is
    expanded as ||a||^2 - 2 a.f_i / t + ||f_i||^2 / t^2 with a = mu - S / t, and ||a||^2,
    the same for every i, is dropped."""
    _check_k(features, k)
    f = features.detach().to(torch.float64)
    mu = f.mean(0)
    sq = (f * f).sum(1)  # (n,) ||f_i||^2
    total = torch.zeros_like(mu)  # S, the sum of the selected features
    taken = torch.zeros(len(f), dtype=torch.bool, device=f.device)
    order = []
    for t in range(1, k + 1):
        a = mu - total / t
        score = sq / t**2 - 2.0 * (f @ a) / t
        i = int(torch.argmin(score.masked_fill(taken, torch.inf)))
        order.append(i)
        taken[i] = True
        total += f[i]
    return torch.tensor(order, dtype=torch.int64)


def k_center_greedy(features: torch.Tensor, k: int) -> torch.Tensor:
    """(k,) int64 indices into `features` (n, D), distinct, in selection order: the greedy
    2-approximation of the k-center problem used as a coreset by Sener & Savarese, "Active
    Learning for Convolutional Neural Networks: A Core-Set Approach" (ICLR 2018, Alg. 1).
    The first pick is the sample nearest the mean of all n; each next one is the unselected
    sample whose Euclidean distance to its nearest selected sample is largest. Float64; ties
    go to the lowest index. Memory O(n) beyond a float64 copy of the features: a running
    (n,) distance to the nearest selected sample, updated with each pick (no n x n matrix),
    squared distances expanded as ||f_i||^2 - 2 f_i.f_j + ||f_j||^2 (clamped at 0)."""
    _check_k(features, k)
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    f = features.detach().to(torch.float64)
    sq = (f * f).sum(1)  # (n,) ||f_i||^2

    def sq_dist(v: torch.Tensor) -> torch.Tensor:  # (n,) squared distance of each f_i to v
        return (sq - 2.0 * (f @ v) + v @ v).clamp_(min=0)

    i = int(torch.argmin(sq_dist(f.mean(0))))
    order = [i]
    nearest = sq_dist(f[i])  # (n,) squared distance to the nearest selected sample
    taken = torch.zeros(len(f), dtype=torch.bool, device=f.device)
    taken[i] = True
    for _ in range(k - 1):
        i = int(torch.argmax(nearest.masked_fill(taken, -torch.inf)))
        order.append(i)
        taken[i] = True
        torch.minimum(nearest, sq_dist(f[i]), out=nearest)
    return torch.tensor(order, dtype=torch.int64)
