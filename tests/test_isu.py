import pytest
import torch

from d3s_core.isu import RunningStats, isu_mix, isu_weight, teacher_for_batch


def batch_stats(x):
    return x.mean(0), torch.cov(x.T, correction=0)


def make_batches(n_batches=4, size=30, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(size, c, generator=g, dtype=torch.float64) * (1 + b) + 3 * b
        for b in range(n_batches)
    ]


def test_paper_mode_is_eq2_by_hand():
    batches = make_batches()
    run = RunningStats.zeros([[5]])
    mu_run = torch.zeros(5, dtype=torch.float64)
    sig_run = torch.zeros(5, 5, dtype=torch.float64)
    for b, x in enumerate(batches, start=1):
        mu_b, sig_b = batch_stats(x)
        # Eq. 2, with b 1-indexed
        mu_hat = mu_b / b + (1 - 1 / b) * mu_run
        sig_hat = sig_b / b + (1 - 1 / b) * sig_run
        w = isu_weight("paper", b, run.images_done, len(x))
        got = isu_mix(mu_b, sig_b, run.means[0][0], run.covs[0][0], w, "paper")
        assert torch.allclose(got[0], mu_hat, rtol=1e-14) and torch.allclose(
            got[1], sig_hat, rtol=1e-14
        )
        run = run.updated([[(mu_b, sig_b)]], len(x), "paper")
        mu_run, sig_run = mu_hat, sig_hat
        assert run.batches_done == b
    assert torch.allclose(run.means[0][0], mu_run) and torch.allclose(run.covs[0][0], sig_run)
    # The paper's mix of centred covariances is the average of per-batch covariances: it misses
    # the between-batch spread of the means.
    pooled = torch.cov(torch.cat(batches).T, correction=0)
    assert not torch.allclose(run.covs[0][0], pooled, rtol=1e-3)


@pytest.mark.parametrize("sizes", [(30, 30, 30), (30, 10, 50, 7)])
def test_exact_mode_equals_pooled_statistics(sizes):
    g = torch.Generator().manual_seed(1)
    batches = [
        torch.randn(n, 4, generator=g, dtype=torch.float64) * (i + 1) + 5 * i
        for i, n in enumerate(sizes)
    ]
    run = RunningStats.zeros([[4], [4]])  # two teachers, both updated every batch (Alg. 3)
    for x in batches:
        s = batch_stats(x)
        run = run.updated([[s], [s]], len(x), "exact")
    allx = torch.cat(batches)
    for m in range(2):
        assert torch.allclose(run.means[m][0], allx.mean(0), rtol=1e-12)
        assert torch.allclose(run.covs[m][0], torch.cov(allx.T, correction=0), rtol=1e-10)


def test_exact_mix_during_batch_matches_pooled_of_seen_plus_current():
    a, b = make_batches(2)
    run = RunningStats.zeros([[5]]).updated([[batch_stats(a)]], len(a), "exact")
    w = isu_weight("exact", 2, run.images_done, len(b))
    mu, sig = isu_mix(*batch_stats(b), run.means[0][0], run.covs[0][0], w, "exact")
    both = torch.cat([a, b])
    assert torch.allclose(mu, both.mean(0)) and torch.allclose(sig, torch.cov(both.T, correction=0))


def test_first_batch_uses_its_own_statistics_and_off_mode_ignores_running():
    x = make_batches(1)[0]
    s = batch_stats(x)
    for mode in ("paper", "exact", "off"):
        w = isu_weight(mode, 1, 0, len(x))
        mu, sig = isu_mix(
            *s, torch.ones(5, dtype=torch.float64), torch.eye(5, dtype=torch.float64), w, mode
        )
        assert torch.equal(mu, s[0]) and torch.equal(sig, s[1])
    assert isu_weight("off", 7, 100, 10) == 1.0
    with pytest.raises(ValueError):
        isu_weight("paper", 0, 0, 10)


def test_mix_is_differentiable_in_batch_stats():
    x = torch.randn(20, 3, dtype=torch.float64, requires_grad=True)
    run = RunningStats.zeros([[3]]).updated([[batch_stats(make_batches(1, c=3)[0])]], 30, "paper")
    mu, sig = isu_mix(*batch_stats(x), run.means[0][0], run.covs[0][0], 0.5, "paper")
    (mu.sum() + sig.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_teacher_choice():
    # m = b mod M with b 1-indexed: batch 1 -> teacher 1, batch M -> teacher 0.
    assert [teacher_for_batch(b, 3, "per_batch") for b in range(1, 7)] == [1, 2, 0, 1, 2, 0]
    assert teacher_for_batch(5, 3, "single") == 0
    assert teacher_for_batch(5, 3, "per_iteration") is None
