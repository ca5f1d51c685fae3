"""The CUDA fast-path switches (d3s_core/precision.py) on CPU: bf16 autocast of the network
with float32/float64 statistics, channels_last, torch.compile, frozen teachers; and the same
on CUDA where there is one (`gpu` tests).

Every test runs with 1 and 4 torch threads. Trajectories of several iterations are compared
in float64 (`dtype="float64"`), where they agree to rounding on every CPU; float32 only by
what one iteration or the loss bounds (Adam moves a pixel whose gradient is rounding noise by
about lr either way, so float32 pixels of two layouts drift apart by chaos, not by error)."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from d3s_core.isu import RunningStats
from d3s_core.layers import default_measured_layers
from d3s_core.precision import network_autocast
from d3s_core.stats import SuffStats, batch_moments, centred_gram, round_to_tf32
from d3s_core.synthesis import (
    SynthesisConfig,
    finish_batch,
    init_state,
    run_iterations,
    synthesis_loss,
)
from storage.config import parse_config
from storage.run import open_run
from tasks.stages import open_data
from tasks.stages.common import data_splits
from tasks.stages.stats import compute_shard, load_shard

from .configs import CONFIG
from .helpers import CFG, fresh_state, measured, running_for, tiny_teacher

CURVE_F32_REL = 2e-2  # float32 loss curves of a few iterations, two layouts or threads


@pytest.fixture(autouse=True, params=[1, 4], ids=lambda n: f"threads{n}")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


# Measured on the tiny teacher (CPU bf16 autocast vs float32): total loss 2.4e-3 relative,
# per layer <= 8e-3, gradient cosine 0.992. bf16 keeps 8 mantissa bits (~4e-3 per rounding).
BF16_LOSS_RTOL = 1e-2
BF16_LAYER_RTOL = 3e-2
BF16_GRAD_COSINE = 0.95


def loss_and_grad(teacher, cfg, images, labels):
    running = running_for([teacher])
    x = images.clone().requires_grad_(True)
    loss, _, per_layer, _ = synthesis_loss(
        teacher, x, labels, running.means[0], running.covs[0], 1.0, cfg
    )
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), per_layer.detach(), grad


def test_defaults_keep_the_float32_nchw_eager_path():
    cfg = SynthesisConfig()
    assert (cfg.autocast, cfg.channels_last, cfg.compile) == ("off", False, False)
    assert parse_config({}).stats.autocast == "off"
    with network_autocast("cpu", "off"):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="autocast mode"):
        network_autocast("cpu", "fp16")  # type: ignore[arg-type]


def test_bf16_autocast_loss_is_close_to_float32_and_gradient_finite():
    teacher = measured(0)
    state = fresh_state()
    loss32, layers32, grad32 = loss_and_grad(teacher, CFG, state.images, state.labels)
    bf16 = dataclasses.replace(CFG, autocast="bf16")
    loss16, layers16, grad16 = loss_and_grad(teacher, bf16, state.images, state.labels)
    assert loss16.dtype == loss32.dtype == torch.float64  # the KL stays float64
    assert grad16.dtype == torch.float32 and torch.isfinite(grad16).all()
    assert abs(loss16 - loss32) <= BF16_LOSS_RTOL * abs(loss32)
    assert ((layers16 - layers32).abs() <= BF16_LAYER_RTOL * layers32.abs()).all()
    cosine = F.cosine_similarity(grad16.flatten(), grad32.flatten(), dim=0)
    assert cosine >= BF16_GRAD_COSINE, float(cosine)


def test_moments_of_bf16_activations_are_float32_and_stats_float64():
    teacher = measured(0)
    x = fresh_state().images
    logits, acts = teacher(x, "bf16")
    assert logits.dtype == torch.float32
    assert all(a.dtype == torch.bfloat16 for a in acts)  # the network did run in bf16
    with network_autocast("cpu", "bf16"):  # batch_moments turns autocast off itself
        moments = [batch_moments(a) for a in acts]
    for (mean, cov), a in zip(moments, acts, strict=True):
        assert mean.dtype == cov.dtype == torch.float32
        ref_mean, ref_cov = SuffStats.from_batch(a.float(), "float64").mean_cov()
        assert torch.allclose(mean.double(), ref_mean, rtol=1e-5, atol=1e-5)
        assert torch.allclose(cov.double(), ref_cov, rtol=1e-4, atol=1e-5)
    for precision in ("mixed", "float64"):
        s = SuffStats.from_batch(acts[0], precision)
        assert s.mean.dtype == s.m2.dtype == torch.float64


def test_channels_last_synthesis_equals_nchw():
    nchw, nhwc = measured(0), measured(0)  # configure() converts the model in place
    cl = dataclasses.replace(CFG, channels_last=True)
    state = fresh_state()
    loss_a, _, grad_a = loss_and_grad(nchw, CFG, state.images, state.labels)
    loss_b, _, grad_b = loss_and_grad(
        nhwc.configure(channels_last=True), cl, state.images, state.labels
    )
    assert nhwc.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    _, acts = nhwc(state.images)  # NHWC activations: Moments' (N, C) views need no copy
    assert all(a.is_contiguous(memory_format=torch.channels_last) for a in acts)
    # float32 summation order only (measured: loss 1.4e-6, gradient 3.1e-5 relative; the
    # gradient goes through Sigma_T^-1, which amplifies rounding).
    assert torch.allclose(loss_a, loss_b, rtol=1e-5)
    assert (grad_a - grad_b).norm() <= 2e-4 * grad_a.norm()

    # Several iterations: float64 trajectories agree to rounding; float32 loss curves within
    # CURVE_F32_REL (the first iteration sees the same images: summation order only).
    for dtype in ("float64", "float32"):
        cfg = dataclasses.replace(CFG, iterations=4, dtype=dtype)
        cl = dataclasses.replace(cfg, channels_last=True)
        torch_dtype = cfg.torch_dtype
        a, hist_a = run_iterations(fresh_state(dtype=torch_dtype), [nchw], running_for([nchw]), cfg)
        b, hist_b = run_iterations(fresh_state(dtype=torch_dtype), [nhwc], running_for([nhwc]), cl)
        assert a.images.dtype == b.images.dtype == torch_dtype
        la, lb = torch.stack([h.loss for h in hist_a]), torch.stack([h.loss for h in hist_b])
        if dtype == "float64":
            assert torch.allclose(la, lb, rtol=1e-10)
            assert (a.images - b.images).norm() <= 1e-9 * a.images.norm()
        else:
            assert torch.allclose(la[0], lb[0], rtol=1e-5)
            assert torch.allclose(la, lb, rtol=CURVE_F32_REL)
    assert b.images.is_contiguous()  # the state (and its checkpoints) stay NCHW


def test_teacher_weights_get_no_gradient():
    teacher = measured(0)
    cfg = dataclasses.replace(CFG, iterations=2, autocast="bf16", channels_last=True)
    state, _ = run_iterations(fresh_state(), [teacher], running_for([teacher]), cfg)
    finish_batch(state, [teacher], running_for([teacher]), cfg)
    params = list(teacher.model.parameters())
    assert params and all(not p.requires_grad and p.grad is None for p in params)
    params[0].requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        run_iterations(fresh_state(), [teacher], running_for([teacher]), cfg)


def stats_pass(tmp_path, name, autocast, device="cpu", workers=0, wrap=False):
    """compute_shard over the whole (synthetic) training set of a fresh run; `wrap` hides the
    in-memory set behind a Subset, so `batches` streams it through a DataLoader."""
    cfg = parse_config(
        {
            **CONFIG,
            "name": name,
            "device": device,
            "stats": {"batch_size": 32, "workers": workers, "autocast": autocast},
        }
    )
    with open_run(tmp_path / name, cfg) as run:
        open_data(run)
        train = data_splits(run)[0]
        if wrap:
            train = torch.utils.data.Subset(train, range(len(train)))
        p = cfg.preset_obj()
        model = tiny_teacher(p.num_classes, p.in_chans).eval().to(device)
        names = default_measured_layers(model)
        compute_shard(run, model, names, train, 0, 0)
        return load_shard(run, 0, 0), run, train


def test_stats_pass_under_bf16_autocast_accumulates_float64(tmp_path):
    ref, _, _ = stats_pass(tmp_path, "fp32", "off")
    got, _, _ = stats_pass(tmp_path, "bf16", "bf16")
    for r, s in zip(ref, got, strict=True):
        assert s.n == r.n and s.mean.dtype == s.m2.dtype == torch.float64
        mu_r, cov_r = r.mean_cov()
        mu, cov = s.mean_cov()
        scale = cov_r.diagonal().max()
        # bf16 activations (8 mantissa bits), not the float64 accumulation, set the error:
        # measured <= 8.3e-3 (means, in units of the largest std) and 9.7e-3 (covariances).
        assert (mu - mu_r).abs().max() <= 3e-2 * scale.sqrt()
        assert (cov - cov_r).abs().max() <= 3e-2 * scale


@pytest.mark.slow
def test_compiled_teacher_matches_eager():
    eager, compiled = measured(0), measured(0)
    cfg = dataclasses.replace(CFG, iterations=2)
    a, hist_a = run_iterations(fresh_state(), [eager], running_for([eager]), cfg)
    b, hist_b = run_iterations(
        fresh_state(), [compiled], running_for([compiled]), dataclasses.replace(cfg, compile=True)
    )
    # iteration 1: the same images, summation order only; iteration 2: within a loss tolerance
    assert torch.allclose(hist_a[0].loss, hist_b[0].loss, rtol=1e-5)
    assert torch.allclose(hist_a[1].loss, hist_b[1].loss, rtol=CURVE_F32_REL)
    assert torch.isfinite(b.images).all()


# ---------------------------------------------------------------- CUDA


@pytest.mark.gpu
def test_cuda_bf16_channels_last_synthesis_smoke():
    cpu_teacher = measured(0)
    gpu_teacher = measured(0)
    gpu_teacher.model.cuda()
    gpu_teacher.targets = [t.to("cuda") for t in gpu_teacher.targets]
    cfg = dataclasses.replace(CFG, iterations=3, autocast="bf16", channels_last=True)
    labels = torch.arange(6) % 4
    state = init_state(1, labels, (3, 12, 12), seed=7, device="cuda")
    running = RunningStats.zeros([gpu_teacher.channels], device="cuda")
    state, hist = run_iterations(state, [gpu_teacher], running, cfg)
    assert state.images.is_cuda and state.images.dtype == torch.float32
    assert all(torch.isfinite(h.loss) for h in hist)
    assert all(p.grad is None for p in gpu_teacher.model.parameters())
    fp32 = dataclasses.replace(CFG, iterations=3)  # CPU float32 NCHW reference
    ref, ref_hist = run_iterations(fresh_state(), [cpu_teacher], running_for([cpu_teacher]), fp32)
    assert abs(float(hist[0].loss) - float(ref_hist[0].loss)) <= BF16_LOSS_RTOL * abs(
        float(ref_hist[0].loss)
    )
    finish_batch(state, [gpu_teacher], running, cfg)
    assert torch.cuda.max_memory_allocated() > 0


@pytest.mark.gpu
def test_cuda_stats_pass_streams_through_pinned_memory(tmp_path, monkeypatch):
    pinned: list[bool] = []

    class SpyLoader(torch.utils.data.DataLoader):
        def __iter__(self):
            for x, y in super().__iter__():
                pinned.append(x.is_pinned())
                yield x, y

    ref, _, _ = stats_pass(tmp_path, "cpu", "off")
    monkeypatch.setattr(torch.utils.data, "DataLoader", SpyLoader)
    got, _, _ = stats_pass(tmp_path, "cuda", "bf16", device="cuda", workers=2, wrap=True)
    assert pinned and all(pinned)  # batches() pins on CUDA and copies with non_blocking
    for r, s in zip(ref, got, strict=True):
        scale = r.mean_cov()[1].diagonal().max()
        assert s.n == r.n and s.m2.dtype == torch.float64
        assert (s.mean_cov()[1].cpu() - r.mean_cov()[1]).abs().max() <= 5e-2 * scale


# ---------------------------------------------------------------- covariance GEMM precision


def _activation(mean_shift, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(1, 64, 1, 1, generator=g) * 3
    return torch.randn(16, 64, 8, 8, generator=g) * scale + mean_shift


@pytest.mark.parametrize("mean_shift", [0.0, 50.0])
def test_tensor_core_covariance_against_float64_numpy(mean_shift):
    """Centred Gram with TF32 / bf16 inputs and float32 accumulation (emulated on CPU: the same
    products): within the inputs' unit roundoff (2^-11, 2^-8) of the largest covariance entry
    of float64 numpy.cov, also under a large mean (measured 3.6e-5 and 3.6e-4 at mean 50,
    where strict-fp32 uncentred X^T X / n - mu mu^T is off by 1.3e-4 and bf16 uncentred by
    3.4e-3: why only centred samples are rounded)."""
    x = _activation(mean_shift)
    s = x.permute(0, 2, 3, 1).reshape(-1, 64).double().numpy()
    ref = torch.from_numpy(np.cov(s.T, bias=True))
    scale = ref.abs().max()
    for mode, bound in (("tf32", 2.0**-11), ("bf16", 2.0**-8)):
        mean, cov = batch_moments(x, mode)
        assert cov.dtype == mean.dtype == torch.float32
        err = float((cov.double() - ref).abs().max() / scale)
        assert err <= bound, (mode, err)
        assert torch.allclose(mean.double(), torch.from_numpy(s.mean(0)), atol=1e-5 * scale)
    with pytest.raises(ValueError, match="covariance GEMM"):
        centred_gram(torch.zeros(4, 2), "fp8")  # type: ignore[arg-type]


def test_tf32_rounding_keeps_ten_mantissa_bits():
    x = torch.tensor([1.0 + 2.0**-10, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, -(1.0 + 2.0**-12)])
    # representable; a tie to even (down); a tie to even (up); below half an ulp
    expect = torch.tensor([1.0 + 2.0**-10, 1.0, 1.0 + 2.0**-9, -1.0])
    assert torch.equal(round_to_tf32(x), expect)


def test_bf16_activation_is_saved_for_backward_as_bf16():
    """No float32 copy of a bf16 activation is kept between forward and backward; the gradient
    comes back in bf16 and equals the float32 formula's on the same values."""
    x = _activation(1.0).bfloat16().requires_grad_(True)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mean, cov = batch_moments(x)
    assert (torch.bfloat16, x.numel()) in saved
    assert all(not (dtype == torch.float32 and n == x.numel()) for dtype, n in saved)
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((cov * w).sum() + mean.sum(), x)
    x32 = x.detach().float().requires_grad_(True)
    mean32, cov32 = batch_moments(x32)
    (ref,) = torch.autograd.grad((cov32 * w).sum() + mean32.sum(), x32)
    assert grad.dtype == torch.bfloat16
    assert (grad.float() - ref).norm() <= 1e-2 * ref.norm()  # bf16 rounding of the gradient


def test_synthesis_with_tensor_core_covariances_is_close_to_full():
    teacher = measured(0)
    state = fresh_state()
    loss, layers, grad = loss_and_grad(teacher, CFG, state.images, state.labels)
    for mode in ("tf32", "bf16"):
        cfg = dataclasses.replace(CFG, cov_matmul=mode)
        loss_m, layers_m, grad_m = loss_and_grad(teacher, cfg, state.images, state.labels)
        assert abs(loss_m - loss) <= 1e-2 * abs(loss), mode
        cosine = F.cosine_similarity(grad_m.flatten(), grad.flatten(), dim=0)
        assert cosine >= 0.99, (mode, float(cosine))
    with pytest.raises(ValueError, match="excludes cov_matmul"):
        parse_config({"synthesis": {"params": {"dtype": "float64", "cov_matmul": "bf16"}}})
