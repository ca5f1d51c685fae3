"""Per-iteration op count and host reads of device values in synthesis, on the CPU.

Counts, with a TorchDispatchMode, the ATen ops each synthesis iteration dispatches and the
reads of a tensor's value on the host (`aten._local_scalar_dense`: `.item()`, `bool()`,
`int()`, `float()`; each is a host-device sync on CUDA), over a checkpoint interval of
`--iterations` of the pipeline's `run_iterations` (ResNet-18 with the 17 measured layers,
`--batch` images of `--size` px, ENS per batch or per iteration). Reads of CPU generator draws
(the per-iteration teacher choice) are counted apart: they are not device syncs. Also prints
the images' SHA-256 after the interval, so two versions of the code can be compared for
bit-identical results.

    .venv/bin/python bench/bench_syncs.py --iterations 10 --batch 8 --size 32
"""

from __future__ import annotations

import argparse
import hashlib
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from d3s_core.isu import RunningStats
from d3s_core.layers import FeatureHooks, default_measured_layers
from d3s_core.loss import prepare_target
from d3s_core.models import build_model, freeze
from d3s_core.stats import SuffStats
from d3s_core.synthesis import MeasuredTeacher, SynthesisConfig, init_state, run_iterations


class Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.reads = 0
        self.generator_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._local_scalar_dense.default:
            # an int64 1-element draw from randint is the ENS per-iteration teacher choice
            if args[0].dtype == torch.int64 and args[0].numel() == 1:
                self.generator_reads += 1
            else:
                self.reads += 1
        return out


def teachers(n: int, size: int, batch: int) -> list[MeasuredTeacher]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        model = freeze(build_model("resnet18", 10, low_res=size < 224))
        layers = default_measured_layers(model)
        x = torch.randn(max(batch, 16), 3, size, size, generator=torch.Generator().manual_seed(9))
        with torch.no_grad(), FeatureHooks(model, layers) as hooks:
            model(x)
            stats = [SuffStats.from_batch(a).mean_cov() for a in hooks.outputs]
        out.append(MeasuredTeacher(model, layers, [prepare_target(m, c) for m, c in stats]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    args = p.parse_args()
    ts = teachers(2, args.size, args.batch)
    for choice in ("per_batch", "per_iteration"):
        cfg = SynthesisConfig(iterations=args.iterations, teacher_choice=choice)
        labels = torch.arange(args.batch) % 10
        state = init_state(1, labels, (3, args.size, args.size), seed=3)
        running = RunningStats.zeros([t.channels for t in ts])
        t0 = time.perf_counter()
        with Counter() as c:
            state, _ = run_iterations(state, ts, running, cfg)
        dt = time.perf_counter() - t0
        digest = hashlib.sha256(state.images.numpy().tobytes()).hexdigest()[:16]
        k = args.iterations
        print(
            f"{choice}: {c.ops / k:.0f} ATen ops per iteration, {c.reads} host reads of tensor "
            f"values in {k} iterations ({c.reads / k:.2f} per iteration), "
            f"{c.generator_reads} CPU generator reads; {dt / k * 1e3:.0f} ms per iteration; "
            f"images sha256 {digest}"
        )


if __name__ == "__main__":
    main()
