"""The distribution-match diagnostic (d3s_core/diagnostics.py) against float64 numpy.cov and
torch.distributions, and its invariants."""

import numpy as np
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from d3s_core.diagnostics import set_match
from d3s_core.stats import as_samples

from .test_synthesis import measured


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 12, 12, generator=g) * 2 - 1


def test_set_match_equals_an_independent_computation():
    teacher = measured(0)
    x, y = _images(10, 5), torch.arange(10) % 4
    r = set_match(teacher, x, y, chunk=3)
    with torch.no_grad():
        logits, acts = teacher(x)
    for layer, (a, t) in enumerate(zip(acts, teacher.targets, strict=True)):
        s = as_samples(a).double().numpy()
        mu_s = torch.from_numpy(s.mean(0))
        cov_s = torch.from_numpy(np.cov(s, rowvar=False, bias=True))
        eye = torch.eye(len(mu_s), dtype=torch.float64)
        ref = kl_divergence(
            MultivariateNormal(mu_s, cov_s + t.ridge * eye),
            MultivariateNormal(t.mean, t.cov + t.ridge * eye),
        )
        assert abs(float(r.kl[layer]) - float(ref)) <= 1e-6 * max(1.0, abs(float(ref)))
    probs = logits.double().softmax(1)
    assert r.top1 == float((logits.argmax(1) == y).double().mean())
    # (the reference forward is one batch, set_match's three chunks: float32 rounding differs)
    assert abs(r.confidence - float(probs[torch.arange(10), y].mean())) < 1e-6


def test_set_match_does_not_depend_on_chunking_and_sees_a_shift():
    teacher = measured(1)
    x, y = _images(24, 6), torch.arange(24) % 4
    whole = set_match(teacher, x, y, chunk=256)
    pieces = set_match(teacher, x, y, chunk=5)
    torch.testing.assert_close(whole.kl, pieces.kl, rtol=1e-9, atol=1e-9)
    assert (whole.top1, whole.confidence) == (pieces.top1, pieces.confidence)
    # The targets were measured on U(-1, 1) images: a set from that distribution matches them
    # far better than the same set shifted.
    shifted = set_match(teacher, x + 0.8, y)
    assert float(shifted.kl.sum()) > 2 * float(whole.kl.sum())
