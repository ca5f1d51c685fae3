"""A model's facts, on PyTorch's `meta` device (shapes only), and the kinds of work a stage does,
shared with the benchmark (bench/bench_throughput.py times `work_step`; the plan counts its
FLOPs)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from d3s_core.layers import FeatureHooks, select_layers
from d3s_core.models import build_model
from d3s_core.stats import SuffStats, batch_moments
from storage.config import RunConfig

from .data import planned_recipe
from .units import F32

# (torch.utils.flop_counter) by `work_step` on the same model.
WORK_KINDS = (
    "teacher_step",  # forward + backward to the weights, train mode
    "stats_forward",  # forward + the measured layers' sufficient statistics, no grad
    "synthesis_iteration",  # forward + batch moments + backward to the input, frozen model
    "label_forward",  # forward, no grad
    "student_step",  # forward + backward to the weights, train mode
)

# Small host-side vectors per distilled image (bytes): synthesis the classes (int64); labels
# and validation an epoch's permutation (int64), its batches as Python int lists (8-byte
# pointer + 28-byte int) and the label file's three index columns read back.


# -- the work of each kind, shared with the benchmark -----------------------------------------
def prepare(kind: str, model: nn.Module) -> nn.Module:
    """Train mode with weight gradients for the training steps; eval and frozen otherwise."""
    train = kind in ("teacher_step", "student_step")
    model.train(train)
    for p in model.parameters():
        p.requires_grad_(train)
    return model


def work_step(
    kind: str,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    layers: list[str],
    opt: torch.optim.Optimizer | None = None,
) -> None:
    """One unit of `kind` on the batch x: (B, C, H, W) normalised, y: (B,) classes. The model
    must be `prepare`d for the kind. Synthesis is the pipeline's iteration without the
    batch-size-independent KL (a few C x C Cholesky factorisations) and without the crops."""

    if kind == "stats_forward":
        reduce = partial(SuffStats.from_batch, precision="mixed")
        with torch.no_grad(), FeatureHooks(model, layers, reduce) as hooks:
            model(x)
            assert len(hooks.outputs) == len(layers)  # every measured layer was reduced
    elif kind == "label_forward":
        with torch.no_grad():
            model(x)
    elif kind in ("teacher_step", "student_step"):
        F.cross_entropy(model(x), y).backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    elif kind == "synthesis_iteration":
        images = x.detach().requires_grad_(True)
        with FeatureHooks(model, layers) as hooks:
            logits = model(images)
            moments = [batch_moments(a) for a in hooks.outputs]
        loss = F.cross_entropy(logits, y) + sum(m.sum() + c.sum() for m, c in moments)
        loss.backward()
    else:
        raise ValueError(f"unknown kind of work {kind!r}; expected one of {WORK_KINDS}")


def count_flops(kind: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, layers) -> float:
    """FLOPs of one `work_step` on x (torch's counter: matmuls and convolutions, 2 per MAC)."""

    prepare(kind, model)
    with FlopCounterMode(display=False) as counter:
        work_step(kind, model, x, y, layers)
    return float(counter.get_total_flops())


# -- a model's facts, on the meta device ------------------------------------------------------
@dataclass(frozen=True)
class ModelFacts:
    """Per image unless named otherwise; bytes for float32.

    saved_train: activations saved for backward in a training step; saved_input: the same for
    the gradient to the input of a frozen eval-mode model (synthesis); forward_live: alive at
    once in a no-grad forward (the largest module's input + output); largest_activation: the
    largest module output (the backward's gradient buffers are counted in multiples of it,
    `BACKWARD_BUFFERS`); largest_measured: the largest measured layer's output."""

    params: int
    weight_bytes: int  # state_dict (weights + buffers), float32
    channels: tuple[int, ...]  # C of each measured layer
    saved_train: int
    saved_input: int
    forward_live: int
    largest_activation: int
    largest_measured: int
    flops: dict[str, float]
    penultimate: int = 0  # D: in_features of the last nn.Linear (the coreset features); 0: none


def _saved_bytes(model: nn.Module, x: torch.Tensor, kind: str) -> int:
    """Bytes of the non-parameter tensors autograd saves in one forward (each tensor once)."""
    prepare(kind, model)
    own = {id(t) for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, tuple[torch.Tensor, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in own:
            seen[id(t)] = (t, t.numel() * t.element_size())  # keep t: ids stay unique
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x.requires_grad_(kind == "synthesis_iteration"))
    return sum(b for _, b in seen.values())


def _forward_sizes(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(max over leaf modules of input + output bytes, largest output bytes) of a forward."""
    sizes: list[tuple[int, int]] = []

    def nbytes(v: Any) -> int:
        ts = v if isinstance(v, (tuple, list)) else (v,)
        return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))

    def hook(_m: nn.Module, inp: Any, out: Any) -> None:
        sizes.append((nbytes(inp), nbytes(out)))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return max(i + o for i, o in sizes), max(o for _, o in sizes)


@lru_cache(maxsize=16)
def model_facts(
    arch: str,
    num_classes: int,
    in_chans: int,
    image_size: int,
    low_res: bool,
    width: int,
    layers_spec: str | tuple[str, ...] | None = None,
) -> ModelFacts:
    """The facts of one architecture at one input size, from forward passes on `meta` tensors
    (no memory, no arithmetic): batches of 2 and 3, so per-image terms are differences."""

    with torch.device("meta"):
        model = build_model(
            arch, num_classes, in_chans=in_chans, low_res=low_res, width=width
        ).float()
    spec = list(layers_spec) if isinstance(layers_spec, tuple) else layers_spec
    layers = select_layers(model, spec)
    modules = dict(model.named_modules())

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.empty(n, in_chans, image_size, image_size, device="meta")
        return x, torch.zeros(n, dtype=torch.int64, device="meta")

    def per_image(f) -> int:
        # batches of 2 and 3: a training-mode batch norm refuses one value per channel (a
        # batch of 1 at a 1 x 1 feature map: small images through a deep network)
        return f(batch(3)[0]) - f(batch(2)[0])

    saved_train = per_image(lambda x: _saved_bytes(model, x, "teacher_step"))
    saved_input = per_image(lambda x: _saved_bytes(model, x, "synthesis_iteration"))
    prepare("label_forward", model)
    live, largest = _forward_sizes(model, batch(1)[0])
    measured: dict[str, int] = {}

    def record(name: str):
        def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
            measured[name] = out.numel() * out.element_size()

        return hook

    handles = [modules[n].register_forward_hook(record(n)) for n in layers]
    with torch.no_grad():
        model(batch(1)[0])
    for h in handles:
        h.remove()
    x2, y2 = batch(2)
    flops = {k: count_flops(k, model, x2, y2, layers) / 2 for k in WORK_KINDS}
    state = model.state_dict()
    return ModelFacts(
        params=sum(p.numel() for p in model.parameters()),
        weight_bytes=sum(t.numel() * F32 for t in state.values() if t.is_floating_point())
        + sum(t.numel() * t.element_size() for t in state.values() if not t.is_floating_point()),
        channels=tuple(modules[n].out_channels for n in layers),  # type: ignore[misc]
        saved_train=saved_train,
        saved_input=saved_input,
        forward_live=live,
        largest_activation=largest,
        largest_measured=max(measured.values()),
        flops=flops,
        penultimate=_penultimate(model),
    )


def _penultimate(model: nn.Module) -> int:
    """Width of the features d3s_core.coresets.penultimate_features takes: the input of the
    model's last registered nn.Linear (0 if it has none)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].in_features if linears else 0


def facts_for(cfg: RunConfig, arch: str) -> ModelFacts:
    """Facts of the teachers (`arch` = the preset's: `stats.layers` names their measured
    layers) or of another architecture (students: the default layers, used by no stage)."""
    p = planned_recipe(cfg)
    layers = cfg.stats.layers if arch == p.arch else None
    spec = tuple(layers) if isinstance(layers, list) else layers
    return model_facts(arch, p.num_classes, p.in_chans, p.image_size, p.low_res, p.width, spec)
