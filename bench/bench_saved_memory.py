"""Bytes saved for backward per distilled image in one synthesis step, by autocast mode.

The memory of a synthesis step at batch B is dominated by what autograd keeps between the
forward and the backward; this counts it exactly (torch.autograd.graph.saved_tensors_hooks,
each tensor's storage counted once) for the pipeline's own `synthesis_loss` on ResNet-18 with
the 17 measured layers, per image, at `--size` px, for float32 and for bf16 autocast (with the
covariance GEMM `full` and `bf16`). Runs on the CPU: the counts are the same on CUDA.

    .venv/bin/python bench/bench_saved_memory.py --size 224 --batch 2
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from d3s_core.isu import RunningStats
from d3s_core.layers import FeatureHooks, default_measured_layers
from d3s_core.loss import prepare_target
from d3s_core.models import build_model, freeze
from d3s_core.stats import SuffStats
from d3s_core.synthesis import MeasuredTeacher, SynthesisConfig, init_state, synthesis_loss


def saved_bytes(teacher: MeasuredTeacher, cfg: SynthesisConfig, batch: int, size: int) -> int:
    labels = torch.arange(batch) % 10
    state = init_state(1, labels, (3, size, size), seed=1)
    running = RunningStats.zeros([teacher.channels])
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    x = state.images.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _, _, _ = synthesis_loss(
            teacher, x, labels, running.means[0], running.covs[0], 1.0, cfg
        )
    torch.autograd.grad(loss, x)
    return sum(seen.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    model = freeze(build_model("resnet18", 10, low_res=args.size < 224))
    layers = default_measured_layers(model)
    with torch.no_grad(), FeatureHooks(model, layers) as hooks:
        model(torch.randn(4, 3, args.size, args.size))
        stats = [SuffStats.from_batch(a).mean_cov() for a in hooks.outputs]
    teacher = MeasuredTeacher(model, layers, [prepare_target(m, c) for m, c in stats])
    base = SynthesisConfig(iterations=1)
    rows = [
        ("float32", base),
        ("bf16 autocast", dataclasses.replace(base, autocast="bf16")),
        (
            "bf16 autocast + cov_matmul bf16",
            dataclasses.replace(base, autocast="bf16", cov_matmul="bf16"),
        ),
    ]
    ref = None
    for name, cfg in rows:
        per_image = saved_bytes(teacher, cfg, args.batch, args.size) / args.batch / 2**20
        ref = ref or per_image
        print(
            f"{name:<34} {per_image:6.2f} MiB saved for backward per image ({per_image / ref:.2f}x)"
        )


if __name__ == "__main__":
    main()
