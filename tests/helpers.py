"""Small shared builders for the tests."""

import torch

from d3s_core.models import build_model


def tiny_teacher(num_classes: int = 4, in_chans: int = 3, width: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    return build_model("small_resnet", num_classes, in_chans=in_chans, low_res=True, width=width)


def random_spd(c: int, cond: float = 10.0, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Symmetric positive definite matrix with condition number `cond`."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=dtype))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), c, dtype=dtype)
    return (q * eig) @ q.T
