"""Batch-wise image synthesis (Alg. 1 and 3, Eq. 1 and 2, Table 9) as an explicit state.

A batch's whole optimisation state (images, Adam moments, iteration, RNG) is plain tensors and
ints in `SynthesisState`, so running iterations 0..K equals running 0..j, saving the state,
loading it and running j..K, bit for bit on CPU. Adam and the cosine schedule are written out
here for that reason: nothing hides in an optimiser object.

Data-parallel synthesis (`world`, d3s_core/distributed.py): each rank holds rows
`world.rows(B)` of the images and Adam moments and the whole batch's labels and RNG; crops and
initial images are drawn for the whole batch on every rank and sliced, so each rank's rows are
exactly those a single process would have, and the loss is the whole batch's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .augment import apply_crops, curriculum_scale, draw_crops, pixel_bounds
from .distributed import World, gather_rows, label_loss_across, moments_across
from .isu import IsuMode, RunningStats, TeacherChoice, isu_mix, isu_weight, teacher_for_batch
from .layers import FeatureHooks
from .loss import (
    GaussianTarget,
    TargetGroup,
    diagonal_kl_layers,
    kl_layers,
    kl_layers_unchecked,
    label_loss,
    moment_matching_layers,
    stack_targets,
)
from .models import freeze
from .precision import AutocastMode, CompiledForward, network_autocast, to_channels_last
from .stats import CovMatmul, at_least_float32, batch_moments
from .teachers import check_bool, check_choice, check_numbers, check_range

__all__ = [
    "DTYPES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MeasuredTeacher",
    "RidgeLog",
    "StepMetrics",
    "SynthesisConfig",
    "SynthesisState",
    "adam_update",
    "cosine_lr",
    "finish_batch",
    "gather_state",
    "init_state",
    "run_iterations",
    "shard_state",
    "synthesis_loss",
]

LossKind = Literal["kl", "kl_diag", "bn", "bn_full"]
SynthesisDtype = Literal["float32", "float64"]
DTYPES = {"float32": torch.float32, "float64": torch.float64}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class SynthesisConfig:
    """Hyperparameters of image synthesis (Table 9 for the paper's values).

    loss: "kl" (Eq. 1, D3S), "kl_diag" (diagonal covariances), "bn" (SRe2L/CDA moment matching
    of means and variances), "bn_full" (the same with full covariances), all against the
    full-dataset statistics. mean/std: the normalisation, used to keep pixels in [0, 1].

    Speed switches (d3s_core/precision.py; the defaults leave the computation as it always was):
    autocast: "bf16" runs the teachers' forward (and so their backward) under bfloat16 autocast;
    the measured activations are cast to float32 for their moments, the KL and CE stay
    float32/float64, images and Adam state stay float32. channels_last: teachers' weights and
    inputs in NHWC (the images in the state stay NCHW). compile: torch.compile of the teachers'
    forward (slow first iteration; an error, not a fallback, where it cannot compile).

    cov_matmul: the batch covariances' GEMM (d3s_core/stats.py `centred_gram`): "full" in the
    activations' precision (float32: uncentred, strict fp32), "tf32" or "bf16": centred, on
    tensor cores with float32 accumulation (about 1e-3 / 4e-3 relative to the covariance).

    dtype: "float32" (the paper's) or "float64": images, Adam state, the teachers' forward, the
    moments and the cross-entropy in float64. float64 runs are exact to rounding whatever the
    number of ranks or threads, so tests can compare trajectories; slow, and on consumer GPUs
    very slow. It excludes autocast.
    """

    iterations: int = 1000
    lr: float = 0.25
    betas: tuple[float, float] = (0.5, 0.9)
    eps: float = 1e-8
    alpha: float = 20.0
    ridge: float = 1e-4
    loss: LossKind = "kl"
    isu: IsuMode = "paper"
    teacher_choice: TeacherChoice = "per_batch"
    min_crop_scale: float = 0.08
    curriculum_end: float = 1.0
    flip: bool = True
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    autocast: AutocastMode = "off"
    channels_last: bool = False
    compile: bool = False
    dtype: SynthesisDtype = "float32"
    cov_matmul: CovMatmul = "full"

    def __post_init__(self) -> None:
        check_range("iterations", self.iterations, ge=1, integer=True)
        check_range("lr", self.lr, ge=0)  # 0: the initial images unchanged (a baseline)
        for i, beta in enumerate(check_numbers("betas", self.betas, length=2)):
            check_range(f"betas[{i}]", beta, ge=0, lt=1)
        check_range("eps", self.eps, gt=0)
        check_range("alpha", self.alpha, ge=0)
        check_range("ridge", self.ridge, gt=0)
        check_choice("loss", self.loss, LossKind)
        check_choice("isu", self.isu, IsuMode)
        check_choice("teacher_choice", self.teacher_choice, TeacherChoice)
        check_range("min_crop_scale", self.min_crop_scale, gt=0, le=1)
        check_range("curriculum_end", self.curriculum_end, gt=0, le=1)
        mean = check_numbers("mean", self.mean)
        std = check_numbers("std", self.std)
        if len(mean) != len(std):
            raise ValueError(f"std: {len(std)} values but mean has {len(mean)}; one per channel")
        for i, m in enumerate(mean):
            check_range(f"mean[{i}]", m)
        for i, s in enumerate(std):
            check_range(f"std[{i}]", s, gt=0)
        for name in ("flip", "channels_last", "compile"):
            check_bool(name, getattr(self, name))
        check_choice("autocast", self.autocast, AutocastMode)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {list(DTYPES)}")
        if self.dtype == "float64" and self.autocast != "off":
            raise ValueError(f"dtype 'float64' excludes autocast {self.autocast!r}")
        if self.cov_matmul not in ("full", "tf32", "bf16"):
            raise ValueError(f"cov_matmul: {self.cov_matmul!r} is not one of full, tf32, bf16")
        if self.dtype == "float64" and self.cov_matmul != "full":
            raise ValueError(f"dtype 'float64' excludes cov_matmul {self.cov_matmul!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


class MeasuredTeacher:
    """A frozen teacher with hooks on its measured layers and its full-dataset Gaussians.

    `configure` sets its memory layout and compilation (run_iterations and finish_batch apply
    the SynthesisConfig's); autocast is chosen per call.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], targets: Sequence[GaussianTarget]):
        if len(layers) != len(targets):
            raise ValueError(f"{len(layers)} measured layers but {len(targets)} targets")
        self.model = freeze(model)
        self.layers = list(layers)
        self.targets = targets
        self.hooks = FeatureHooks(self.model, self.layers)
        self.channels_last = False
        self._nhwc_weights = False
        self._compiled: CompiledForward | None = None
        self._use_compiled = False
        self.dtype = torch.float32

    @property
    def targets(self) -> list[GaussianTarget]:
        return self._targets

    @targets.setter
    def targets(self, targets: Sequence[GaussianTarget]) -> None:
        self._targets = list(targets)
        self._groups: list[TargetGroup] | None = None

    @property
    def target_groups(self) -> list[TargetGroup]:
        """The targets stacked by width for Eq. 1, built once (not in every step)."""
        if self._groups is None:
            self._groups = stack_targets(self._targets)
        return self._groups

    @property
    def channels(self) -> list[int]:
        return [t.dim for t in self.targets]

    def configure(
        self,
        channels_last: bool = False,
        compile: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> MeasuredTeacher:
        """Inputs (and, once, the weights) in channels_last; the compiled forward, built on
        first request and kept; the weights in `dtype` (float32 -> float64 is exact, and back).
        False leaves the model as it was given. Checks the weights are still frozen: the
        gradient is for the images only, none is computed or kept for them."""
        if any(p.requires_grad for p in self.model.parameters()):
            raise ValueError("teacher weights require grad; synthesis needs a frozen teacher")
        if dtype != self.dtype:
            if self._compiled is not None:
                raise ValueError("a compiled teacher cannot change its dtype")
            self.model.to(dtype)
            self.dtype = dtype
        if channels_last and not self._nhwc_weights:
            to_channels_last(self.model)
            self._nhwc_weights = True
        self.channels_last = channels_last
        if compile and self._compiled is None:
            self._compiled = CompiledForward(self.model)
        self._use_compiled = compile
        return self

    def __call__(
        self, x: torch.Tensor, autocast: AutocastMode = "off"
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """logits (N, classes) float32 (float64 for a float64 teacher) and the measured
        activations, one (N, C_l, H_l, W_l) per layer (bfloat16 under autocast "bf16": the
        moments cast them to float32)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.hooks.clear()
        compiled = self._compiled if self._use_compiled else None
        forward = compiled if compiled is not None else self.model
        with network_autocast(x.device.type, autocast):
            logits = forward(x)
        return at_least_float32(logits), self.hooks.outputs

    @torch.no_grad()
    def batch_stats(
        self,
        x: torch.Tensor,
        world: World | None = None,
        autocast: AutocastMode = "off",
        batch_rows: int | None = None,
        cov_matmul: CovMatmul = "full",
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(mean, cov) per measured layer of the images x; with `world`, x is this rank's rows
        of a batch of `batch_rows` and the statistics are those of the whole batch."""
        _, acts = self(x, autocast)
        if world is not None:
            return moments_across(acts, world, batch_rows, cov_matmul)
        return [batch_moments(a, cov_matmul) for a in acts]


@dataclass
class SynthesisState:
    """Everything one batch's optimisation needs to continue exactly where it stopped.

    batch_index: b, 1-indexed over the distilled set; iteration: steps done (0..K);
    images/exp_avg/exp_avg_sq: (B, C, H, W) float32 (float64 in a float64 run), images in
    normalised space;
    labels: (B,) int64 classes; rng_state: CPU torch.Generator state (uint8).
    On a rank of a data-parallel run, images/exp_avg/exp_avg_sq are rows `world.rows(B)` only
    (`shard_state`, `gather_state`); labels and rng_state are the whole batch's.
    """

    batch_index: int
    iteration: int
    images: torch.Tensor
    labels: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    rng_state: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        """All state as named tensors (ints as 0-d int64), for storage."""
        return {
            "batch_index": torch.tensor(self.batch_index),
            "iteration": torch.tensor(self.iteration),
            "images": self.images,
            "labels": self.labels,
            "exp_avg": self.exp_avg,
            "exp_avg_sq": self.exp_avg_sq,
            "rng_state": self.rng_state,
        }

    @staticmethod
    def from_tensors(
        t: dict[str, torch.Tensor],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> SynthesisState:
        return SynthesisState(
            batch_index=int(t["batch_index"]),
            iteration=int(t["iteration"]),
            images=t["images"].to(device, dtype).contiguous(),
            labels=t["labels"].to(device, torch.int64),
            exp_avg=t["exp_avg"].to(device, dtype).contiguous(),
            exp_avg_sq=t["exp_avg_sq"].to(device, dtype).contiguous(),
            rng_state=t["rng_state"].to("cpu", torch.uint8),
        )


def init_state(
    batch_index: int,
    labels: torch.Tensor,
    image_shape: tuple[int, int, int],
    seed: int,
    init_images: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    world: World | None = None,
    dtype: torch.dtype = torch.float32,
) -> SynthesisState:
    """Start batch b: images from N(0, 1) in normalised space (SRe2L's init), or copies of
    `init_images` (B, C, H, W) (real-image initialisation). With `world`, the whole batch is
    drawn and this rank keeps its rows. The draw is float32 whatever `dtype` (the images are
    then cast), so float32 and float64 runs start from the same images."""
    g = torch.Generator().manual_seed(seed)
    shape = (len(labels), *image_shape)
    if init_images is None:
        images = torch.randn(shape, generator=g)
    else:
        if tuple(init_images.shape) != shape:
            raise ValueError(f"init_images has shape {tuple(init_images.shape)}, expected {shape}")
        images = init_images.detach().float().clone()
    if world is not None:
        images = images[world.rows(len(labels))].clone()
    images = images.to(device, dtype)
    return SynthesisState(
        batch_index=batch_index,
        iteration=0,
        images=images,
        labels=labels.to(device, torch.int64),
        exp_avg=torch.zeros_like(images),
        exp_avg_sq=torch.zeros_like(images),
        rng_state=g.get_state(),
    )


def cosine_lr(base_lr: float, iteration: int, iterations: int) -> float:
    """Cosine annealing from base_lr at iteration 0 towards 0 at `iterations`."""
    return 0.5 * base_lr * (1 + math.cos(math.pi * iteration / iterations))


def adam_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
) -> None:
    """One Adam step in place, the same arithmetic as torch.optim.Adam (single-tensor path).

    step: 1-indexed count including this one.
    """
    b1, b2 = betas
    exp_avg.lerp_(grad, 1 - b1)
    exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    bias1 = 1 - b1**step
    bias2_sqrt = math.sqrt(1 - b2**step)
    denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias1)


@dataclass
class StepMetrics:
    """Detached results of one iteration: loss (total), ce, per-layer distribution loss (L,).

    ridges: the ridge each layer's batch covariance got in Eq. 1 (L floats), known only for a
    step run with the ridge check (an interval redone because a Cholesky failed at the
    configured ridge, `run_iterations`); None otherwise, where every layer had the configured
    ridge (a failure would have redone the step checked)."""

    iteration: int
    teacher: int
    loss: torch.Tensor
    ce: torch.Tensor
    layer_losses: torch.Tensor = field(repr=False)
    ridges: tuple[float, ...] | None = field(default=None, repr=False)


@dataclass
class RidgeLog:
    """The ridges one batch's Eq. 1 put on its synthetic-batch covariances, over its iterations.

    configured: the config's ridge; max_used: the largest ridge any step used (configured if no
    Cholesky needed more); escalated_layers: "teacher/layer" -> the largest ridge that layer
    got, for layers that needed more than configured; escalated_steps: iterations where any
    layer did. escalated_targets: "teacher/layer" -> the ridge of a full-dataset target that
    needed more than configured when it was prepared (`prepare_target`; the teacher side of
    Eq. 1, the same for every batch). Recorded only where the loop already learns of an
    escalation (`StepMetrics.ridges`): no host-device sync of its own.
    """

    configured: float
    max_used: float
    escalated_layers: dict[str, float] = field(default_factory=dict)
    escalated_steps: int = 0
    escalated_targets: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def start(cfg: SynthesisConfig, teachers: Sequence[MeasuredTeacher]) -> RidgeLog:
        """An empty log for a batch (the targets' escalations noted)."""
        targets = {
            f"{m}/{name}": t.ridge
            for m, teacher in enumerate(teachers)
            for name, t in zip(teacher.layers, teacher.targets, strict=True)
            if t.ridge > cfg.ridge
        }
        return RidgeLog(cfg.ridge, cfg.ridge, escalated_targets=targets)

    def add(self, history: Sequence[StepMetrics], teachers: Sequence[MeasuredTeacher]) -> None:
        """Fold in the steps of `history` (each once: a step added twice counts twice)."""
        for h in history:
            if h.ridges is None:
                continue
            escalated = False
            for name, r in zip(teachers[h.teacher].layers, h.ridges, strict=True):
                if r > self.configured:
                    key = f"{h.teacher}/{name}"
                    self.escalated_layers[key] = max(r, self.escalated_layers.get(key, r))
                    self.max_used = max(self.max_used, r)
                    escalated = True
            self.escalated_steps += int(escalated)

    def as_dict(self) -> dict[str, Any]:
        """Plain values (JSON), the keys of the commit record's "ridge"."""
        return {
            "configured": self.configured,
            "max_used": self.max_used,
            "escalated_layers": dict(self.escalated_layers),
            "escalated_steps": self.escalated_steps,
            "escalated_targets": dict(self.escalated_targets),
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> RidgeLog:
        return RidgeLog(
            float(d["configured"]),
            float(d["max_used"]),
            {k: float(v) for k, v in d.get("escalated_layers", {}).items()},
            int(d.get("escalated_steps", 0)),
            {k: float(v) for k, v in d.get("escalated_targets", {}).items()},
        )


def synthesis_loss(
    teacher: MeasuredTeacher,
    images: torch.Tensor,
    labels: torch.Tensor,
    running_means: Sequence[torch.Tensor],
    running_covs: Sequence[torch.Tensor],
    isu_w: float,
    cfg: SynthesisConfig,
    world: World | None = None,
    check: bool = True,
    batch_rows: int | None = None,
    *,
    ridges_used: list[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 1 on ISU-mixed statistics (Eq. 2) plus alpha * CE. Returns (total, ce, per-layer,
    failed): failed is a () bool tensor, True if a batch Cholesky failed at the configured ridge
    with check=False (no host-device sync; the step must then be redone with check=True, which
    escalates the ridge as `kl_layers` does). With check=True it is False.

    With `world`, images/labels are this rank's rows and all values are the whole batch's (the
    same on every rank); the gradient to the rows is the single-process one. batch_rows: the
    whole batch's row count (lets the all-reduce skip a sync). ridges_used: with check=True and
    the "kl" loss, filled with the ridge each layer got (`kl_layers`); left as it is otherwise.
    """
    logits, acts = teacher(images, cfg.autocast)
    if world is None:
        moments = [batch_moments(a, cfg.cov_matmul) for a in acts]
    else:
        moments = moments_across(acts, world, batch_rows, cfg.cov_matmul)
    mixed = [
        isu_mix(bm, bc, rm, rc, isu_w, cfg.isu)
        for (bm, bc), rm, rc in zip(moments, running_means, running_covs, strict=True)
    ]
    means = [m for m, _ in mixed]
    covs = [c for _, c in mixed]
    targets = teacher.targets
    failed = torch.zeros((), dtype=torch.bool, device=images.device)
    if cfg.loss == "kl":
        if check:
            per_layer = kl_layers(
                means, covs, teacher.target_groups, cfg.ridge, ridges_used=ridges_used
            )
        else:
            per_layer, failed = kl_layers_unchecked(means, covs, teacher.target_groups, cfg.ridge)
    elif cfg.loss == "kl_diag":
        per_layer = diagonal_kl_layers(means, covs, targets, cfg.ridge)
    elif cfg.loss in ("bn", "bn_full"):
        per_layer = moment_matching_layers(
            means,
            covs,
            [t.mean for t in targets],
            [t.cov for t in targets],
            diagonal=cfg.loss == "bn",
        )
    else:
        raise ValueError(f"unknown synthesis loss {cfg.loss!r}")
    ce = label_loss(logits, labels) if world is None else label_loss_across(logits, labels, world)
    return per_layer.sum() + cfg.alpha * ce, ce, per_layer, failed


@dataclass
class _Draws:
    """Everything an interval of iterations draws from the batch's generator, drawn up front in
    the order the iterations would draw it: teacher per iteration, crop boxes (T, B, 4) and
    flips (T, B) on the images' device (one pinned, non-blocking copy on CUDA)."""

    teachers: list[int]
    boxes: torch.Tensor
    flips: torch.Tensor
    rng_state: torch.Tensor


def _draw_interval(
    state: SynthesisState, cfg: SynthesisConfig, num_teachers: int, until: int
) -> _Draws:
    g = torch.Generator().manual_seed(0)
    g.set_state(state.rng_state)
    fixed = teacher_for_batch(state.batch_index, num_teachers, cfg.teacher_choice)
    n, k = len(state.labels), cfg.iterations
    chosen, boxes, flips = [], [], []
    for it in range(state.iteration, until):
        m = fixed if fixed is not None else int(torch.randint(num_teachers, (1,), generator=g))
        scale = curriculum_scale(it, k, cfg.min_crop_scale, cfg.curriculum_end)
        b, f = draw_crops(n, g, scale, cfg.flip)
        chosen.append(m)
        boxes.append(b)
        flips.append(f)
    device = state.images.device
    box_t = torch.stack(boxes) if boxes else torch.zeros(0, n, 4)
    flip_t = torch.stack(flips) if flips else torch.zeros(0, n, dtype=torch.bool)
    if device.type == "cuda":
        box_t, flip_t = box_t.pin_memory(), flip_t.pin_memory()
    return _Draws(
        chosen,
        box_t.to(device, non_blocking=True),
        flip_t.to(device, non_blocking=True),
        g.get_state(),
    )


def run_iterations(
    state: SynthesisState,
    teachers: Sequence[MeasuredTeacher],
    running: RunningStats,
    cfg: SynthesisConfig,
    until: int | None = None,
    world: World | None = None,
) -> tuple[SynthesisState, list[StepMetrics]]:
    """Advance `state` to iteration `until` (default: cfg.iterations), in place.

    Each iteration: choose the teacher (ENS), draw a crop box and flip per image (curriculum
    scale), forward, loss on ISU-mixed statistics, gradient to the images only, Adam step with
    the cosine learning rate, clamp to the valid pixel range. With `world`, every rank calls
    this together on its shard of the state (collectives in every iteration).

    One host-device sync per call, not per iteration: the draws of the whole interval are made
    up front, and whether a batch Cholesky failed is checked once at the end. If one did, the
    interval is redone from a copy of the state taken at its start, step by step with the ridge
    escalation of `kl_layers`, so the result is what per-step checking gives. The copy costs
    three batches of images on the device (images and the two Adam moments).
    """
    k = cfg.iterations
    until = k if until is None else until
    if not state.iteration <= until <= k:
        raise ValueError(f"cannot run from iteration {state.iteration} to {until} of {k}")
    if running.batches_done != state.batch_index - 1 and cfg.isu != "off":
        raise ValueError(
            f"ISU statistics cover {running.batches_done} batches, but this is batch "
            f"{state.batch_index}; batches must be synthesised in order"
        )
    n = len(state.labels)
    rows = slice(None) if world is None else world.rows(n)
    if state.images.shape[0] != len(state.labels[rows]):
        raise ValueError(
            f"state holds {state.images.shape[0]} images for {len(state.labels[rows])} labels "
            "of this rank"
        )
    if state.images.dtype != cfg.torch_dtype:
        raise ValueError(f"state images are {state.images.dtype}, the config's dtype {cfg.dtype}")
    where = running.device
    if where is not None and where != state.images.device:
        raise ValueError(
            f"ISU statistics are on {where}, the images on {state.images.device}; "
            "move them with RunningStats.to"
        )
    for t in teachers:
        t.configure(cfg.channels_last, cfg.compile, cfg.torch_dtype)
    draws = _draw_interval(state, cfg, len(teachers), until)
    start = (state.iteration, state.images.clone(), state.exp_avg.clone(), state.exp_avg_sq.clone())
    history, failed = _iterate(state, teachers, running, cfg, draws, world, check=False)
    if bool(failed):  # the one sync of the interval
        state.iteration = start[0]
        state.images.copy_(start[1])
        state.exp_avg.copy_(start[2])
        state.exp_avg_sq.copy_(start[3])
        history, _ = _iterate(state, teachers, running, cfg, draws, world, check=True)
    state.rng_state = draws.rng_state
    return state, history


def _iterate(
    state: SynthesisState,
    teachers: Sequence[MeasuredTeacher],
    running: RunningStats,
    cfg: SynthesisConfig,
    draws: _Draws,
    world: World | None,
    check: bool,
) -> tuple[list[StepMetrics], torch.Tensor]:
    """The iterations of `draws` on `state`, in place; no host-device sync with check=False.
    Returns the metrics and whether any step's Cholesky failed."""
    k = cfg.iterations
    n = len(state.labels)
    rows = slice(None) if world is None else world.rows(n)
    labels = state.labels[rows]
    w = isu_weight(cfg.isu, state.batch_index, running.images_done, n)
    lo, hi = (
        b.to(state.images.device, state.images.dtype) for b in pixel_bounds(cfg.mean, cfg.std)
    )
    failed = torch.zeros((), dtype=torch.bool, device=state.images.device)
    history: list[StepMetrics] = []
    first = state.iteration
    for j, m in enumerate(draws.teachers):
        it = first + j
        x = state.images.detach().requires_grad_(True)
        ridges: list[float] | None = [] if check else None
        loss, ce, per_layer, bad = synthesis_loss(
            teachers[m],
            apply_crops(x, draws.boxes[j][rows], draws.flips[j][rows]),
            labels,
            running.means[m],
            running.covs[m],
            w,
            cfg,
            world,
            check,
            n,
            ridges_used=ridges,
        )
        failed = failed | bad
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            adam_update(
                state.images,
                grad,
                state.exp_avg,
                state.exp_avg_sq,
                it + 1,
                cosine_lr(cfg.lr, it, k),
                cfg.betas,
                cfg.eps,
            )
            torch.maximum(torch.minimum(state.images, hi, out=state.images), lo, out=state.images)
        state.iteration = it + 1
        history.append(
            StepMetrics(
                it + 1,
                m,
                loss.detach(),
                ce.detach(),
                per_layer.detach(),
                tuple(ridges) if ridges else None,
            )
        )
    return history, failed


@torch.no_grad()
def finish_batch(
    state: SynthesisState,
    teachers: Sequence[MeasuredTeacher],
    running: RunningStats,
    cfg: SynthesisConfig,
    world: World | None = None,
) -> RunningStats:
    """Alg. 3's last step: after batch b, update the running statistics of every teacher with
    the statistics of the finished (un-augmented) images (of the whole batch, with `world`)."""
    if state.iteration != cfg.iterations:
        raise ValueError(
            f"batch {state.batch_index} is at iteration {state.iteration} of "
            f"{cfg.iterations}; finish it first"
        )
    stats = [
        t.configure(cfg.channels_last, cfg.compile, cfg.torch_dtype).batch_stats(
            state.images, world, cfg.autocast, len(state.labels), cfg.cov_matmul
        )
        for t in teachers
    ]
    return running.updated(stats, len(state.labels), cfg.isu)


def shard_state(state: SynthesisState, world: World) -> SynthesisState:
    """This rank's rows of a whole-batch state (e.g. a checkpoint read on resume)."""
    rows = world.rows(len(state.labels))
    return SynthesisState(
        state.batch_index,
        state.iteration,
        state.images[rows].clone(),
        state.labels,
        state.exp_avg[rows].clone(),
        state.exp_avg_sq[rows].clone(),
        state.rng_state,
    )


def gather_state(state: SynthesisState, world: World, dst: int = 0) -> SynthesisState | None:
    """The whole-batch state on rank `dst` (None elsewhere); every rank must call it."""
    n = len(state.labels)
    images = gather_rows(state.images, world, n, dst)
    m = gather_rows(state.exp_avg, world, n, dst)
    v = gather_rows(state.exp_avg_sq, world, n, dst)
    if images is None or m is None or v is None:
        return None
    return SynthesisState(
        state.batch_index, state.iteration, images, state.labels, m, v, state.rng_state
    )
