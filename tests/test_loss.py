import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from d3s_core.loss import (
    diagonal_kl_layers,
    gaussian_kl,
    kl_layers,
    moment_matching_layers,
    prepare_target,
)

from .helpers import random_spd


def reference_kl(mu_s, sig_s, mu_t, sig_t):
    return kl_divergence(
        MultivariateNormal(mu_s, covariance_matrix=sig_s),
        MultivariateNormal(mu_t, covariance_matrix=sig_t),
    )


@pytest.mark.parametrize("c,cond", [(5, 10.0), (32, 1e3), (64, 1e7)])
def test_kl_matches_torch_distributions(c, cond):
    ridge = 1e-6
    g = torch.Generator().manual_seed(c)
    mu_t, mu_s = (
        torch.randn(c, generator=g, dtype=torch.float64),
        torch.randn(c, generator=g, dtype=torch.float64),
    )
    sig_t, sig_s = random_spd(c, cond, seed=1), random_spd(c, cond, seed=2)
    target = prepare_target(mu_t, sig_t, ridge=ridge)
    eye = torch.eye(c, dtype=torch.float64)
    ours = gaussian_kl(mu_s, sig_s, target)
    ref = reference_kl(mu_s, sig_s + ridge * eye, mu_t, sig_t + ridge * eye)
    # Direction matters: Eq. 1 is KL(S || T); the reverse is a different number.
    rev = reference_kl(mu_t, sig_t + ridge * eye, mu_s, sig_s + ridge * eye)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=0)
    assert not torch.allclose(ours, rev, rtol=1e-3)


def test_kl_float32_inputs_still_match():
    c = 16
    sig_t, sig_s = random_spd(c, 100.0, 3), random_spd(c, 100.0, 4)
    mu = torch.zeros(c, dtype=torch.float64)
    target = prepare_target(mu, sig_t, ridge=1e-4)
    ours = gaussian_kl(mu.float(), sig_s.float(), target)
    eye = 1e-4 * torch.eye(c, dtype=torch.float64)
    assert torch.allclose(ours, reference_kl(mu, sig_s + eye, mu, sig_t + eye), rtol=1e-5)


def test_kl_of_gaussian_with_itself_is_zero_even_when_singular():
    c = 24
    x = torch.randn(200, 6, dtype=torch.float64) @ torch.randn(6, c, dtype=torch.float64)
    mu, sig = x.mean(0), torch.cov(x.T, correction=0)  # rank 6 of 24
    target = prepare_target(mu, sig, ridge=1e-4)
    assert abs(float(gaussian_kl(mu, sig, target))) < 1e-8


def test_kl_gradients_finite_and_correct_direction():
    c = 8
    sig_t = random_spd(c, 50.0, 5)
    target = prepare_target(torch.zeros(c, dtype=torch.float64), sig_t)
    x = torch.randn(100, c, dtype=torch.float64, requires_grad=True)
    mu, sig = x.mean(0), torch.cov(x.T, correction=0)
    kl = gaussian_kl(mu, sig, target)
    (grad,) = torch.autograd.grad(kl, x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # A small step against the gradient lowers the KL.
    with torch.no_grad():
        y = x - 1e-3 * grad
        assert gaussian_kl(y.mean(0), torch.cov(y.T, correction=0), target) < kl


def test_batched_layers_equal_one_by_one():
    dims = [4, 8, 4, 8, 16]
    targets = [
        prepare_target(torch.randn(d, dtype=torch.float64), random_spd(d, 10.0, i))
        for i, d in enumerate(dims)
    ]
    means = [torch.randn(d) for d in dims]
    covs = [random_spd(d, 20.0, 10 + i).float() for i, d in enumerate(dims)]
    batched = kl_layers(means, covs, targets)
    single = torch.stack(
        [gaussian_kl(m, s, t) for m, s, t in zip(means, covs, targets, strict=True)]
    )
    assert torch.allclose(batched, single, rtol=1e-12)


def test_ridge_grows_instead_of_failing_on_indefinite_matrix():
    c = 6
    target = prepare_target(torch.zeros(c, dtype=torch.float64), torch.eye(c, dtype=torch.float64))
    bad = -1e-3 * torch.eye(c, dtype=torch.float64)  # slightly negative: rounding gone wrong
    assert torch.isfinite(gaussian_kl(torch.zeros(c), bad, target))


def test_diagonal_kl_equals_full_kl_of_diagonal_matrices():
    c = 10
    vt, vs = torch.rand(c, dtype=torch.float64) + 0.1, torch.rand(c, dtype=torch.float64) + 0.1
    mt, ms = torch.randn(c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
    target = prepare_target(mt, torch.diag(vt), ridge=1e-6)
    full_t = prepare_target(mt, torch.diag(vt), ridge=1e-6)
    dense_s = torch.diag(vs) + 0.05 * random_spd(c, 2.0, 9)  # off-diagonals are ignored
    diag = diagonal_kl_layers([ms], [dense_s], [target])[0]
    full = gaussian_kl(ms, torch.diag(torch.diagonal(dense_s)), full_t)
    assert torch.allclose(diag, full, rtol=1e-10)


def test_moment_matching_is_zero_at_target_and_weights_first_layer():
    mu, sig = torch.randn(5), random_spd(5, 3.0, 0).float()
    assert moment_matching_layers([mu], [sig], [mu], [sig]).item() == 0.0
    d = moment_matching_layers(
        [mu + 1, mu + 1], [sig, sig], [mu, mu], [sig, sig], first_multiplier=10.0
    )
    assert torch.allclose(d, torch.tensor([10.0, 1.0]) * 5**0.5)
    full = moment_matching_layers(
        [mu], [sig + 0.1], [mu], [sig], diagonal=False, first_multiplier=1.0
    )
    assert torch.allclose(full, torch.tensor([0.1 * 5]))
