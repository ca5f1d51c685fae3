import numpy as np
import pytest
import torch

from d3s_core.layers import FeatureHooks, default_measured_layers, select_layers
from d3s_core.models import build_model
from d3s_core.stats import SuffStats, batch_moments, merge_all

from .helpers import tiny_teacher


def hooked_activations(model, batches, names):
    """The measured layers' outputs, collected by hand with our hooks."""
    outs = {n: [] for n in names}
    with FeatureHooks(model, names) as hooks, torch.no_grad():
        for x in batches:
            model(x)
            for n, a in zip(names, hooks.outputs, strict=True):
                outs[n].append(a.permute(0, 2, 3, 1).reshape(-1, a.shape[1]).double().numpy())
    return {n: np.concatenate(v) for n, v in outs.items()}


def stream_stats(model, batches, names, precision):
    acc: dict[str, SuffStats] = {}
    with FeatureHooks(model, names) as hooks, torch.no_grad():
        for x in batches:
            model(x)
            for n, a in zip(names, hooks.outputs, strict=True):
                s = SuffStats.from_batch(a, precision)
                acc[n] = acc[n].merge(s) if n in acc else s
    return acc


@pytest.mark.parametrize("precision,tol", [("float64", 1e-10), ("mixed", 2e-5)])
def test_streamed_statistics_equal_numpy_cov(precision, tol):
    model = tiny_teacher().eval()
    names = default_measured_layers(model)
    # Offset images: activations with a large mean, where raw second moments would cancel.
    batches = [torch.randn(6, 3, 16, 16) * 2 + 3 for _ in range(5)]
    ref = hooked_activations(model, batches, names)
    ours = stream_stats(model, batches, names, precision)
    for n in names:
        mu, cov = ours[n].mean_cov()
        x = ref[n]
        assert ours[n].n == x.shape[0]
        np.testing.assert_allclose(mu.numpy(), x.mean(0), rtol=tol, atol=tol * np.abs(x).max())
        ref_cov = np.cov(x, rowvar=False, bias=True)
        err = np.abs(cov.numpy() - ref_cov).max() / np.abs(ref_cov).max()
        assert err <= tol, (n, err)


def test_merge_order_does_not_matter():
    g = torch.Generator().manual_seed(3)
    parts = [
        SuffStats.from_batch(torch.randn(50 + 7 * i, 12, generator=g) * (i + 1) + i, "float64")
        for i in range(9)
    ]
    sequential = parts[0]
    for p in parts[1:]:
        sequential = sequential.merge(p)
    perm = torch.randperm(len(parts), generator=g).tolist()
    shuffled = merge_all([parts[i] for i in perm])
    reversed_ = merge_all(parts[::-1])
    for other in (shuffled, reversed_):
        assert other.n == sequential.n
        for a, b in zip(sequential.mean_cov(), other.mean_cov(), strict=True):
            assert (a - b).abs().max() / b.abs().max() <= 1e-10


def test_shards_merge_to_one_pass():
    x = torch.randn(1000, 7, dtype=torch.float64) * 5 + 2
    whole = SuffStats.from_batch(x, "float64")
    shards = merge_all([SuffStats.from_batch(c, "float64") for c in x.split(137)])
    for a, b in zip(whole.mean_cov(), shards.mean_cov(), strict=True):
        assert (a - b).abs().max() / b.abs().max() <= 1e-10
    assert SuffStats.empty(7).merge(whole) is whole


def test_batch_moments_match_numpy_and_are_differentiable():
    x = torch.randn(4, 5, 6, 6, requires_grad=True)
    mu, cov = batch_moments(x)
    s = x.detach().permute(0, 2, 3, 1).reshape(-1, 5).double().numpy()
    np.testing.assert_allclose(mu.detach().numpy(), s.mean(0), atol=1e-6)
    np.testing.assert_allclose(cov.detach().numpy(), np.cov(s, rowvar=False, bias=True), atol=1e-5)
    cov.trace().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_channels_last_gives_same_statistics():
    x = torch.randn(3, 8, 5, 5)
    a, b = batch_moments(x), batch_moments(x.to(memory_format=torch.channels_last))
    assert torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-6)


def test_resnet18_measures_the_17_main_path_convs():
    model = build_model("resnet18", 10)
    names = default_measured_layers(model)
    expected = ["conv1"] + [
        f"layer{s}.{b}.conv{c}" for s in range(1, 5) for b in range(2) for c in (1, 2)
    ]
    assert names == expected and len(names) == 17
    assert not any("downsample" in n for n in names)
    # Output channels of the measured layers: stem + 4 per stage.
    mods = dict(model.named_modules())
    assert [mods[n].out_channels for n in names] == [64] * 5 + [128] * 4 + [256] * 4 + [512] * 4


def test_layer_selection_by_pattern_and_names():
    model = build_model("resnet18", 10)
    assert select_layers(model, r"layer4\..*") == [
        "layer4.0.conv1",
        "layer4.0.conv2",
        "layer4.0.downsample.0",
        "layer4.1.conv1",
        "layer4.1.conv2",
    ]
    assert select_layers(model, ["layer2.0.conv1", "conv1"]) == ["conv1", "layer2.0.conv1"]
    with pytest.raises(ValueError, match="nope"):
        select_layers(model, ["nope"])
    with pytest.raises(ValueError, match="matches no"):
        select_layers(model, r"xyz.*")


def test_other_architectures_have_measured_layers():
    r50 = build_model("resnet50", 10)
    assert len(default_measured_layers(r50)) == 1 + 16 * 3  # stem + 3 convs per bottleneck
    timm_model = build_model("timm:resnet10t", 10)
    names = default_measured_layers(timm_model)
    assert names and not any("downsample" in n for n in names)
    lowres = build_model("resnet18", 10, low_res=True)
    assert lowres.conv1.kernel_size == (3, 3) and isinstance(lowres.maxpool, torch.nn.Identity)
    assert lowres(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def reference_moments(x):
    s = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) if x.dim() == 4 else x
    mean = s.mean(0)
    c = s - mean
    return mean, c.T @ c / s.shape[0]


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "samples"])
def test_batch_moments_gradient_matches_autograd(layout):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, 4, generator=g, dtype=torch.float64) + 2
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "samples":
        x = x[:, :, 0, 0].contiguous()
    w1, w2 = (
        torch.randn(5, generator=g, dtype=torch.float64),
        torch.randn(5, 5, generator=g, dtype=torch.float64),
    )
    from d3s_core.stats import Moments

    xa = x.detach().clone().requires_grad_(True)
    mu, cov = Moments.apply(xa)
    (ours,) = torch.autograd.grad((mu * w1).sum() + (cov * w2).sum(), xa)
    xb = x.detach().clone().requires_grad_(True)
    mu_r, cov_r = reference_moments(xb)
    (ref,) = torch.autograd.grad((mu_r * w1).sum() + (cov_r * w2).sum(), xb)
    assert torch.allclose(mu, mu_r) and torch.allclose(cov, cov_r)
    assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-12)
    assert ours.stride() == x.stride()  # gradient in the activation's own layout
    # mean-only and covariance-only paths
    (g_mu,) = torch.autograd.grad(Moments.apply(xa)[0].sum(), xa)
    (g_mu_r,) = torch.autograd.grad(reference_moments(xb)[0].sum(), xb)
    assert torch.allclose(g_mu, g_mu_r)


def test_merge_tree_streams_the_level_by_level_pairwise_merge():
    """merge_tree merges exactly the pairs, in the order, of merging neighbours level by level
    (so the streamed shard merge gives the bytes the all-in-memory merge gave), and holds only
    O(log n) partial results."""
    from d3s_core.stats import merge_tree

    def levelwise(parts):
        while len(parts) > 1:
            parts = [
                f"({parts[i]} {parts[i + 1]})" if i + 1 < len(parts) else parts[i]
                for i in range(0, len(parts), 2)
            ]
        return parts[0]

    for n in range(1, 70):
        held, peak = [0], [0]

        def parts(n=n, held=held, peak=peak):
            for i in range(n):
                held[0] += 1
                peak[0] = max(peak[0], held[0])
                yield str(i)

        def merge(a, b, held=held):
            held[0] -= 1
            return f"({a} {b})"

        assert merge_tree(parts(), merge) == levelwise([str(i) for i in range(n)])
        assert peak[0] <= n.bit_length() + 1
