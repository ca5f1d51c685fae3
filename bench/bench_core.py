"""Overhead of D3S's statistics pass and synthesis step over a bare ResNet-18, as ratios.

Measured per image size, on a frozen torchvision ResNet-18 (1000 classes, eval mode; 64 and
32 px use the low-resolution 3x3 stem without max-pool), all in one process:

(a) stats pass: no-grad forward with FeatureHooks on the 17 default layers, each layer's
    output reduced inside its hook by `SuffStats.from_batch(out, precision)` and merged into
    a running SuffStats per layer, over `--stats-batches` batches  ÷  a bare no-grad forward
    over the same batches.
    Reported for precision "mixed" (the default) and "float64". Goal <= 1.10x.
(b) synthesis iteration: `synthesis_loss` (forward with the 17 hooks, `batch_moments` per
    layer, ISU mix against zero running statistics at batch 1, 17-layer KL + alpha * CE) and
    `torch.autograd.grad` to the images  ÷  a bare forward + cross-entropy + `autograd.grad`
    to the images. No augmentation on either side. Goal <= 1.15x.

Each side is warmed up, then baseline and candidate repeats are interleaved (alternating which
goes first); the table shows the median of each side, the ratio of the medians ("ratio", the
number the goal applies to) and the median of the per-repeat ratios ("paired", which is less
sensitive to the machine changing speed during the run). A "machine" line before and after
reports sgemm throughput and the latency of a small threaded op: on a shared VM whose vCPUs are
being descheduled the latter rises from ~20 us to ~8 ms, and every ratio is then inflated.

    .venv/bin/python bench/bench_core.py
    .venv/bin/python bench/bench_core.py --sizes 64 --repeats 7 --batch-64 64
    .venv/bin/python bench/bench_core.py --channels-last      # model and images channels_last
    .venv/bin/python bench/bench_core.py --device cuda --batch-224 128
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from d3s_core.isu import RunningStats
from d3s_core.layers import FeatureHooks, default_measured_layers
from d3s_core.loss import prepare_target
from d3s_core.models import build_model, freeze
from d3s_core.stats import Precision, SuffStats, merge_all
from d3s_core.synthesis import MeasuredTeacher, SynthesisConfig, synthesis_loss

NUM_CLASSES = 1000
DEFAULT_BATCH = {224: 16, 64: 32, 32: 64}
GOAL_STATS = 1.10
GOAL_SYNTH = 1.15

# A side is run once per call and returns its own elapsed seconds, so per-repeat setup
# (registering hooks) stays outside the timed region.
Side = Callable[[], float]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def compare(
    baseline: Side, candidate: Side, repeats: int, warmup: int
) -> tuple[list[float], list[float]]:
    """Seconds of each side over interleaved repeats (pair r is run back to back, baseline first
    on even r), after `warmup` untimed runs of each."""
    for _ in range(warmup):
        baseline()
        candidate()
    base: list[float] = []
    cand: list[float] = []
    for r in range(repeats):
        if r % 2 == 0:
            base.append(baseline())
            cand.append(candidate())
        else:
            cand.append(candidate())
            base.append(baseline())
    return base, cand


def machine_check(device: torch.device) -> str:
    """sgemm throughput and the latency of a small multi-threaded op. On a shared VM whose
    vCPUs get descheduled, the latter jumps from microseconds to milliseconds, every op then
    waits at a thread barrier, and op-heavy candidates look worse than their FLOPs say."""
    a = torch.randn(1024, 1024, device=device)
    v = torch.randn(1 << 18, device=device)
    gemm = statistics.median(clock(lambda: a @ a, device) for _ in range(5))
    small = statistics.median(clock(lambda: v + 1, device) for _ in range(50))
    return f"sgemm 1024^2 {2 * 1024**3 / gemm / 1e9:.0f} GFLOP/s, 1 MB add {small * 1e6:.0f} us"


def make_model(size: int, device: torch.device, fmt: torch.memory_format) -> nn.Module:
    model = freeze(build_model("resnet18", NUM_CLASSES, low_res=size < 224))
    return model.to(device, memory_format=fmt)


def make_batches(
    n: int, batch: int, size: int, device: torch.device, fmt: torch.memory_format
) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(size)
    return [
        torch.randn(batch, 3, size, size, generator=g).to(device, memory_format=fmt)
        for _ in range(n)
    ]


# ---------------------------------------------------------------- (a) statistics pass


def stats_sides(
    model: nn.Module, batches: list[torch.Tensor], precision: Precision, device: torch.device
) -> tuple[Side, Side]:
    layers = default_measured_layers(model)
    modules = dict(model.named_modules())
    channels = [modules[n].out_channels for n in layers]

    @torch.no_grad()
    def bare() -> None:
        for x in batches:
            model(x)

    @torch.no_grad()
    def stats_pass() -> list[SuffStats]:
        # As the statistics stage does it: each activation is reduced inside its hook.
        reduce = partial(SuffStats.from_batch, precision=precision)
        with FeatureHooks(model, layers, reduce) as hooks:
            running = [SuffStats.empty(c, device) for c in channels]
            for x in batches:
                hooks.clear()
                model(x)
                running = [r.merge(s) for r, s in zip(running, hooks.outputs, strict=True)]
            return running

    return (lambda: clock(bare, device)), (lambda: clock(stats_pass, device))


# ---------------------------------------------------------------- (b) synthesis iteration


def measured_targets(model: nn.Module, batches: list[torch.Tensor]) -> list:
    """Gaussian targets per default layer, from the statistics of a few random batches."""
    layers = default_measured_layers(model)
    per_batch = []
    with torch.no_grad(), FeatureHooks(model, layers) as hooks:
        for x in batches:
            model(x)
            per_batch.append([SuffStats.from_batch(a) for a in hooks.outputs])
    merged = [merge_all([b[i] for b in per_batch]) for i in range(len(layers))]
    return [prepare_target(*s.mean_cov()) for s in merged]


def synthesis_sides(
    model: nn.Module, images: torch.Tensor, targets: list, device: torch.device
) -> tuple[Side, Side]:
    cfg = SynthesisConfig()
    layers = default_measured_layers(model)
    labels = torch.arange(len(images), device=device) % NUM_CLASSES
    running = RunningStats.zeros([[t.dim for t in targets]], device=device)

    def bare_step() -> torch.Tensor:
        x = images.detach().requires_grad_(True)
        ce = F.cross_entropy(model(x), labels)
        return torch.autograd.grad(ce, x)[0]

    def baseline() -> float:
        return clock(bare_step, device)

    def candidate() -> float:
        teacher = MeasuredTeacher(model, layers, targets)

        def step() -> torch.Tensor:
            x = images.detach().requires_grad_(True)
            loss, _, _, _ = synthesis_loss(
                teacher, x, labels, running.means[0], running.covs[0], 1.0, cfg
            )
            return torch.autograd.grad(loss, x)[0]

        try:
            return clock(step, device)
        finally:
            teacher.hooks.remove()

    return baseline, candidate


# ---------------------------------------------------------------- driver


@dataclass
class Row:
    measure: str
    size: int
    batch: int
    base: list[float]
    cand: list[float]
    goal: float

    @property
    def ratio(self) -> float:
        """Ratio of the medians (the headline number)."""
        return statistics.median(self.cand) / statistics.median(self.base)

    @property
    def paired(self) -> float:
        """Median of the per-repeat ratios; robust to the machine's speed drifting."""
        return statistics.median(c / b for b, c in zip(self.base, self.cand, strict=True))


HEADER = (
    f"{'measure':<16}{'size':>5}{'batch':>6}{'baseline ms':>13}{'candidate ms':>14}"
    f"{'ratio':>8}{'paired':>8}   goal"
)


def format_row(row: Row) -> str:
    verdict = "ok" if row.ratio <= row.goal else "OVER"
    return (
        f"{row.measure:<16}{row.size:>5}{row.batch:>6}"
        f"{statistics.median(row.base) * 1e3:>13.1f}{statistics.median(row.cand) * 1e3:>14.1f}"
        f"{row.ratio:>7.3f}x{row.paired:>7.3f}x  <= {row.goal:.2f}x {verdict}"
    )


def bench_size(
    size: int, batch: int, args: argparse.Namespace, device: torch.device
) -> Iterator[Row]:
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = make_model(size, device, fmt)
    batches = make_batches(args.stats_batches, batch, size, device, fmt)
    precisions: tuple[Precision, ...] = ("mixed", "float64")
    for precision in precisions:
        sides = stats_sides(model, batches, precision, device)
        yield Row(
            f"stats {precision}",
            size,
            batch,
            *compare(*sides, args.repeats, args.warmup),
            GOAL_STATS,
        )
    targets = measured_targets(model, make_batches(args.target_batches, batch, size, device, fmt))
    sides = synthesis_sides(model, batches[0], targets, device)
    yield Row(
        "synthesis step", size, batch, *compare(*sides, args.repeats, args.warmup), GOAL_SYNTH
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="224,64,32", help="comma-separated image sizes")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per side first")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="model and images in channels_last on both sides (default: contiguous NCHW)",
    )
    p.add_argument("--stats-batches", type=int, default=1, help="batches per stats-pass repeat")
    p.add_argument("--target-batches", type=int, default=2, help="batches for the KL targets")
    for size, batch in DEFAULT_BATCH.items():
        p.add_argument(f"--batch-{size}", type=int, default=batch, help=f"batch at {size} px")
    p.add_argument("--batch", type=int, default=None, help="batch size for any other size")
    return p.parse_args()


def batch_for(size: int, args: argparse.Namespace) -> int:
    batch = getattr(args, f"batch_{size}", None) or args.batch
    if batch is None:
        raise SystemExit(f"no default batch for {size} px; pass --batch")
    return batch


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    layout = "channels_last" if args.channels_last else "NCHW"
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"device {device}{name}, {layout}"
    )
    print(
        f"repeats {args.repeats} per side, interleaved, after {args.warmup} warm-up; "
        f"stats pass over {args.stats_batches} batch(es) per repeat"
    )
    print("ratio = median(candidate) / median(baseline); paired = median of per-repeat ratios")
    print(f"machine before: {machine_check(device)}")
    print(HEADER, flush=True)
    for size in (int(s) for s in args.sizes.split(",")):
        for row in bench_size(size, batch_for(size, args), args, device):
            print(format_row(row), flush=True)
    print(f"machine after:  {machine_check(device)}")


if __name__ == "__main__":
    main()
