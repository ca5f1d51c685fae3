import dataclasses

import pytest
import torch

from d3s_core.augment import apply_crops, curriculum_scale, draw_crops, pixel_bounds
from d3s_core.synthesis import (
    SynthesisState,
    adam_update,
    cosine_lr,
    finish_batch,
    run_iterations,
)
from storage.config import parse_config

from .helpers import CFG, fresh_state, measured, running_for


@pytest.fixture(scope="module")
def teachers():
    return [measured(0), measured(1)]


def test_resume_is_bit_exact(teachers):
    full, _ = run_iterations(fresh_state(), teachers, running_for(teachers), CFG)
    part, _ = run_iterations(fresh_state(), teachers, running_for(teachers), CFG, until=5)
    saved = {k: v.clone() for k, v in part.tensors().items()}
    del part
    resumed = SynthesisState.from_tensors(saved)
    resumed, _ = run_iterations(resumed, teachers, running_for(teachers), CFG)
    for k, v in full.tensors().items():
        assert torch.equal(v, resumed.tensors()[k]), k


def test_resume_is_bit_exact_with_per_iteration_teachers_and_isu(teachers):
    cfg = dataclasses.replace(CFG, teacher_choice="per_iteration", isu="exact")
    run = running_for(teachers)
    first, _ = run_iterations(fresh_state(1), teachers, run, cfg)
    run = finish_batch(first, teachers, run, cfg)
    full, hist = run_iterations(fresh_state(2), teachers, run, cfg)
    part, _ = run_iterations(fresh_state(2), teachers, run, cfg, until=7)
    resumed, _ = run_iterations(SynthesisState.from_tensors(part.tensors()), teachers, run, cfg)
    assert torch.equal(full.images, resumed.images)
    assert len({h.teacher for h in hist}) == 2  # both teachers drawn


def test_loss_goes_down_and_pixels_stay_valid(teachers):
    # Without augmentation the objective is the same function at every step.
    cfg = dataclasses.replace(CFG, iterations=40, min_crop_scale=1.0, flip=False)
    state, hist = run_iterations(fresh_state(), teachers, running_for(teachers), cfg)
    last = torch.stack([h.loss for h in hist[-5:]]).mean()
    assert last < 0.5 * hist[0].loss
    assert hist[-1].ce < hist[0].ce
    lo, hi = pixel_bounds(cfg.mean, cfg.std)
    assert (state.images >= lo).all() and (state.images <= hi).all()
    assert all(h.teacher == 1 for h in hist)  # batch 1, M = 2: m = 1 mod 2
    assert hist[-1].layer_losses.shape == (len(teachers[1].layers),)


@pytest.mark.parametrize("loss", ["kl_diag", "bn", "bn_full"])
def test_ablation_losses_run(teachers, loss):
    cfg = dataclasses.replace(CFG, loss=loss, iterations=3)
    _, hist = run_iterations(fresh_state(), teachers, running_for(teachers), cfg)
    assert all(torch.isfinite(h.loss) for h in hist)


def test_isu_batches_must_come_in_order(teachers):
    with pytest.raises(ValueError, match="in order"):
        run_iterations(fresh_state(b=3), teachers, running_for(teachers), CFG)


def test_finish_batch_updates_every_teacher_with_eq2(teachers):
    run = running_for(teachers)
    state, _ = run_iterations(fresh_state(), teachers, run, CFG)
    after = finish_batch(state, teachers, run, CFG)
    assert after.batches_done == 1 and after.images_done == 6
    for m, t in enumerate(teachers):
        mu, cov = t.batch_stats(state.images)[0]
        # b = 1: the mix is the batch's own statistics
        assert torch.allclose(after.means[m][0], mu.double()) and torch.allclose(
            after.covs[m][0], cov.double()
        )
    with pytest.raises(ValueError, match="finish it first"):
        finish_batch(fresh_state(), teachers, run, CFG)


def test_adam_matches_torch_optim():
    g = torch.Generator().manual_seed(0)
    p_ref = torch.randn(10, generator=g).requires_grad_(True)
    opt = torch.optim.Adam([p_ref], lr=0.25, betas=(0.5, 0.9))
    p, m, v = p_ref.detach().clone(), torch.zeros(10), torch.zeros(10)
    for step in range(1, 8):
        grad = torch.randn(10, generator=g)
        p_ref.grad = grad.clone()
        opt.step()
        adam_update(p, grad, m, v, step, 0.25, (0.5, 0.9), 1e-8)
        assert torch.allclose(p, p_ref.detach(), rtol=1e-6, atol=1e-7)


def test_cosine_and_curriculum():
    assert cosine_lr(0.25, 0, 100) == 0.25 and abs(cosine_lr(0.25, 50, 100) - 0.125) < 1e-12
    lo0, _ = curriculum_scale(0, 100)
    lo_mid, _ = curriculum_scale(49, 100)
    lo_end, hi = curriculum_scale(99, 100)
    assert lo0 > 0.98 and abs(lo_mid - 0.54) < 1e-9 and abs(lo_end - 0.08) < 1e-9 and hi == 1.0


def test_crops_are_drawn_per_image():
    boxes, flips = draw_crops(64, torch.Generator().manual_seed(0))
    assert boxes.unique(dim=0).shape[0] == 64  # not one crop for the whole batch (SRe2L)
    assert 0 < flips.sum() < 64
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes >= 0).all() and (boxes <= 1).all() and ((w * h) > 0.08 * 0.99).all()


def test_identity_box_and_flip_are_exact():
    x = torch.randn(2, 3, 8, 8)
    ident = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    out = apply_crops(x, ident, torch.tensor([False, True]))
    assert torch.allclose(out[0], x[0], atol=1e-5)
    assert torch.allclose(out[1], x[1].flip(-1), atol=1e-5)
    # The left half, resized to full width: column pairs of the input.
    half = apply_crops(x, torch.tensor([[0.0, 0.0, 0.5, 1.0]] * 2), torch.tensor([False, False]))
    assert torch.allclose(
        half[..., 1::2][..., :3], 0.75 * x[..., :3] + 0.25 * x[..., 1:4], atol=1e-5
    )


def test_float64_dtype_is_checked():
    # The config checks the recipe (storage/config.py); SynthesisConfig itself checks nothing.
    with pytest.raises(ValueError, match="excludes autocast"):
        parse_config({"synthesis": {"params": {"dtype": "float64", "autocast": "bf16"}}})
    with pytest.raises(ValueError, match="dtype"):
        parse_config({"synthesis": {"params": {"dtype": "float16"}}})
    teacher = measured(0)
    with pytest.raises(ValueError, match="config's dtype"):  # a float32 state, a float64 run
        run_iterations(fresh_state(), [teacher], running_for([teacher]), replace64(CFG))


def replace64(cfg):
    return dataclasses.replace(cfg, dtype="float64")
