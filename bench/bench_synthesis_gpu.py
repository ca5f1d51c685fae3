"""Wall-clock seconds and peak memory of K synthesis iterations, against the paper's App. D.6.

The paper reports 170 s and 9851 MiB per 1000 iterations (batch 200, 224 px, ResNet-18) on one
RTX 6000 Ada; the goal on one H100 is <= 35 s with no more memory. This runs the pipeline's own
`run_iterations` (ENS teacher, curriculum crops and flips, forward with hooks on the 17 measured
layers, ISU-mixed KL + alpha * CE, gradient to the images only, Adam, clamp) on one batch of
one frozen torchvision ResNet-18 with random weights and Gaussian targets from random images:
the time does not depend on the weights. Untimed warm-up iterations (cuDNN autotuning,
torch.compile) run first on a separate state; the timed run is a fresh batch, iterations 0..K.

Memory: torch.cuda.max_memory_allocated over the timed run (and max_memory_reserved, closer to
what nvidia-smi shows); on CPU, the growth of the peak resident set over the run.

On any CUDA GPU it prints a verdict against the paper (seconds scaled to 1000 iterations,
peak allocated memory against 9851 MiB), and on an H100 a second line against the 35 s goal.
`--device cuda` where torch sees no CUDA is an error (exit 2), not a fallback to the CPU.
`--json PATH` writes the measured figures (bench/gpu_smoke.sh collects them).

    .venv/bin/python bench/bench_synthesis_gpu.py --device cpu --iterations 5 --batch 8 --size 64
    .venv/bin/python bench/bench_synthesis_gpu.py --device cuda --iterations 200 --json fp32.json
    .venv/bin/python bench/bench_synthesis_gpu.py --device cuda                    # paper setting
    .venv/bin/python bench/bench_synthesis_gpu.py --device cuda --autocast bf16 --channels-last
    .venv/bin/python bench/bench_synthesis_gpu.py --device cuda --autocast bf16 --channels-last \
        --compile --cudnn-benchmark
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Any

import torch

from d3s_core.isu import RunningStats
from d3s_core.layers import FeatureHooks, default_measured_layers
from d3s_core.loss import prepare_target
from d3s_core.models import build_model, freeze
from d3s_core.stats import SuffStats
from d3s_core.synthesis import MeasuredTeacher, SynthesisConfig, init_state, run_iterations

NUM_CLASSES = 1000
PAPER: dict[str, Any] = {"seconds": 170.0, "mib": 9851.0, "gpu": "RTX 6000 Ada", "iterations": 1000}
PAPER_SETTING = {"batch": 200, "size": 224}
GOAL_H100_SECONDS = 35.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_mib() -> float:
    """Current resident set of this process (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def make_teacher(args: argparse.Namespace, device: torch.device) -> MeasuredTeacher:
    """Frozen ResNet-18 (64 px and below: the low-resolution stem) with Gaussian targets per
    measured layer from the statistics of one batch of random images."""
    model = freeze(build_model("resnet18", NUM_CLASSES, low_res=args.size < 224)).to(device)
    layers = default_measured_layers(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(min(args.batch, 32), 3, args.size, args.size, generator=g).to(device)
    with torch.no_grad(), FeatureHooks(model, layers) as hooks:
        model(x)
        stats = [SuffStats.from_batch(a).mean_cov() for a in hooks.outputs]
    return MeasuredTeacher(model, layers, [prepare_target(m, c) for m, c in stats])


def run_batch(
    teacher: MeasuredTeacher,
    cfg: SynthesisConfig,
    args: argparse.Namespace,
    device: torch.device,
    seed: int,
    until: int,
) -> float:
    """Iterations 0..until of a fresh batch 1; returns the last loss (synchronises)."""
    labels = torch.arange(args.batch) % NUM_CLASSES
    state = init_state(1, labels, (3, args.size, args.size), seed, device=device)
    running = RunningStats.zeros([teacher.channels], device=device)
    _, history = run_iterations(state, [teacher], running, cfg, until=until)
    return float(history[-1].loss) if history else float("nan")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=1000, help="K, timed iterations")
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--size", type=int, default=224, help="image size, px")
    p.add_argument("--autocast", default="off", choices=("off", "bf16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the teacher's forward")
    p.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations first")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", default=default_device, choices=("cpu", "cuda"))
    p.add_argument("--json", metavar="PATH", help="write the measured figures here as JSON")
    args = p.parse_args(argv)
    if args.iterations < 1:
        p.error("--iterations must be at least 1")
    return args


def require_cuda(device: str) -> None:
    """`--device cuda` without a usable CUDA: one line on stderr, exit 2 (no CPU fallback)."""
    if device == "cuda" and not torch.cuda.is_available():
        print(
            f"bench_synthesis_gpu.py: error: --device cuda, but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})",
            file=sys.stderr,
        )
        sys.exit(2)


def verdict(name: str, per_1000: float, peak_mib: float, reserved_mib: float) -> str:
    """One line against the paper's App. D.6 figures (RTX 6000 Ada)."""
    ratio = per_1000 / PAPER["seconds"]
    return (
        f"on {name}: {per_1000:.1f} s per 1000 iterations = {ratio:.2f}x the paper's "
        f"{PAPER['seconds']:.0f} s ({PAPER['gpu']}); peak {peak_mib:.0f} MiB allocated "
        f"({reserved_mib:.0f} MiB reserved) vs {PAPER['mib']:.0f} MiB"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    require_cuda(args.device)
    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    cfg = SynthesisConfig(
        iterations=args.iterations,
        autocast=args.autocast,
        channels_last=args.channels_last,
        compile=args.compile,
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, device {device} ({name}), threads {torch.get_num_threads()}")
    print(
        f"ResNet-18 (random weights), {NUM_CLASSES} classes, batch {args.batch}, {args.size} px, "
        f"{args.iterations} iterations; autocast {args.autocast}, "
        f"{'channels_last' if args.channels_last else 'NCHW'}, "
        f"{'compiled' if args.compile else 'eager'}, cudnn.benchmark {args.cudnn_benchmark}"
    )
    teacher = make_teacher(args, device)
    print(f"measured layers: {len(teacher.layers)}")

    start = time.perf_counter()
    warmup = min(args.warmup, args.iterations)
    if warmup:
        run_batch(teacher, cfg, args, device, seed=1, until=warmup)
    sync(device)
    print(f"warm-up: {warmup} iterations in {time.perf_counter() - start:.1f} s")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_alloc = torch.cuda.memory_allocated(device) / 2**20
    rss_before = rss_mib()
    sync(device)
    start = time.perf_counter()
    loss = run_batch(teacher, cfg, args, device, seed=2, until=args.iterations)
    sync(device)
    seconds = time.perf_counter() - start

    reserved: float | None = None
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        reserved = torch.cuda.max_memory_reserved(device) / 2**20
        memory = f"peak allocated {peak:.0f} MiB (of which before the run {base_alloc:.0f}), "
        memory += f"peak reserved {reserved:.0f} MiB"
    else:
        peak = max(0.0, peak_rss_mib() - rss_before)
        memory = f"peak RSS growth {peak:.0f} MiB (RSS before {rss_before:.0f} MiB)"
    per_1000 = seconds * 1000 / args.iterations
    print(f"final loss {loss:.4g}")
    print(f"{'':<30}{'seconds':>10}{'it/s':>8}{'s/1000 it':>11}{'peak MiB':>10}")
    print(
        f"{'measured (' + name + ')':<30}{seconds:>10.2f}{args.iterations / seconds:>8.2f}"
        f"{per_1000:>11.1f}{peak:>10.0f}"
    )
    p_it = PAPER["iterations"] / PAPER["seconds"]
    print(
        f"{'paper (' + str(PAPER['gpu']) + ')':<30}{PAPER['seconds']:>10.1f}{p_it:>8.2f}"
        f"{PAPER['seconds']:>11.1f}{PAPER['mib']:>10.0f}"
    )
    goal_s = f"<={GOAL_H100_SECONDS:.0f}"
    goal_it = f">={1000 / GOAL_H100_SECONDS:.1f}"
    goal_mib = f"<={PAPER['mib']:.0f}"
    print(f"{'goal (H100)':<30}{goal_s:>10}{goal_it:>8}{goal_s:>11}{goal_mib:>10}")
    print(memory)
    setting = {"batch": args.batch, "size": args.size}
    paper_setting = setting == PAPER_SETTING and device.type == "cuda"
    if not paper_setting:
        print(
            "note: not the paper's setting (batch 200, 224 px, on a GPU): the reference and "
            "the goal do not apply to these numbers"
        )
    if device.type == "cuda":
        assert reserved is not None
        print(verdict(name, per_1000, peak, reserved))
        if "H100" in name:
            met = per_1000 <= GOAL_H100_SECONDS and peak <= PAPER["mib"]
            print(
                f"H100 goal (<= {GOAL_H100_SECONDS:.0f} s per 1000 iterations, "
                f"<= {PAPER['mib']:.0f} MiB): {'met' if met else 'NOT met'}"
            )
    if args.json:
        figures = {
            "device": str(device),
            "device_name": name,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "batch": args.batch,
            "size": args.size,
            "iterations": args.iterations,
            "warmup": args.warmup,
            "seconds": seconds,
            "iterations_per_second": args.iterations / seconds,
            "seconds_per_1000_iterations": per_1000,
            "peak_allocated_mib": peak if device.type == "cuda" else None,
            "peak_reserved_mib": reserved,
            "peak_rss_growth_mib": peak if device.type != "cuda" else None,
            "final_loss": loss,
            "switches": {
                "autocast": args.autocast,
                "channels_last": args.channels_last,
                "compile": args.compile,
                "cudnn_benchmark": args.cudnn_benchmark,
            },
            "paper_setting": paper_setting,
            "ratio_to_paper": per_1000 / PAPER["seconds"] if device.type == "cuda" else None,
            "paper": PAPER,
        }
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
