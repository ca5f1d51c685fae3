"""Host-device synchronisations per synthesis iteration, counted by CUDA's sync debug mode.

Synthesises batch 1 of a random-weight ResNet-18 (the bench's teacher, bench_synthesis_gpu.py)
to the end and updates the ISU statistics (finish_batch), then starts batch 2 (so the ISU mix
with weight < 1 runs), does `--warmup` iterations, and runs `--iterations` more under
`torch.cuda.set_sync_debug_mode("warn")`, recording every "called a synchronizing CUDA
operation" warning. Prints the count, the count per iteration and the Python lines that
synchronised most often; then the same for batch 2's finish_batch. `--json PATH` writes them.

    python bench/gpu_sync_check.py --json sync.json                # on a GPU
    .venv/bin/python bench/gpu_sync_check.py --device cpu --batch 4 --size 32  # runs, no counts

On the CPU the iterations run but nothing is counted (the sync debug mode is CUDA's).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_synthesis_gpu import NUM_CLASSES, make_teacher, require_cuda  # noqa: E402

from d3s_core.isu import RunningStats  # noqa: E402
from d3s_core.synthesis import (  # noqa: E402
    SynthesisConfig,
    finish_batch,
    init_state,
    run_iterations,
)

SYNC_MESSAGE = "synchronizing CUDA operation"


def counted(device: torch.device, fn: Callable[[], Any]) -> tuple[int, list[tuple[str, int]]]:
    """Run fn under the sync debug mode "warn" (CUDA only); the number of sync warnings and the
    source lines that raised them, most frequent first. (0, []) on the CPU."""
    if device.type != "cuda":
        fn()
        return 0, []
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    syncs = [w for w in caught if SYNC_MESSAGE in str(w.message)]
    where = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    return len(syncs), where.most_common()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--warmup", type=int, default=2, help="iterations of batch 2 not counted")
    ap.add_argument("--iterations", type=int, default=5, help="iterations counted")
    ap.add_argument("--autocast", default="off", choices=("off", "bf16"))
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    require_cuda(args.device)
    device = torch.device(args.device)
    torch.manual_seed(0)
    k = args.warmup + args.iterations
    cfg = SynthesisConfig(iterations=k, autocast=args.autocast, channels_last=args.channels_last)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"torch {torch.__version__} on {name}: ResNet-18, batch {args.batch}, {args.size} px, "
        f"K={k}; autocast {args.autocast}, channels_last {args.channels_last}"
    )
    teacher = make_teacher(args, device)  # reads args.batch and args.size
    labels = torch.arange(args.batch) % NUM_CLASSES
    shape = (3, args.size, args.size)
    running = RunningStats.zeros([teacher.channels], device=device)

    start = time.perf_counter()
    state = init_state(1, labels, shape, seed=1, device=device)
    run_iterations(state, [teacher], running, cfg)
    running = finish_batch(state, [teacher], running, cfg)
    state = init_state(2, labels, shape, seed=2, device=device)
    run_iterations(state, [teacher], running, cfg, until=args.warmup)
    print(
        f"batch 1 and {args.warmup} warm-up iterations of batch 2: "
        f"{time.perf_counter() - start:.1f} s"
    )

    n_iter, where_iter = counted(
        device, lambda: run_iterations(state, [teacher], running, cfg, until=k)
    )
    n_finish, where_finish = counted(device, lambda: finish_batch(state, [teacher], running, cfg))
    if device.type != "cuda":
        print("sync check: not counted on the CPU (torch.cuda.set_sync_debug_mode is CUDA's)")
    else:
        per_it = n_iter / args.iterations
        print(
            f"sync check: {n_iter} host-device syncs in {args.iterations} iterations of batch 2 "
            f"= {per_it:.1f} per iteration; {n_finish} in finish_batch"
        )
        for label, where in (("iterations", where_iter), ("finish_batch", where_finish)):
            for loc, count in where[:10]:
                print(f"  {label:<13} {count:>5}  {loc}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device_name": name,
                    "torch": torch.__version__,
                    "batch": args.batch,
                    "size": args.size,
                    "iterations_counted": args.iterations,
                    "counted": device.type == "cuda",
                    "syncs": n_iter,
                    "syncs_per_iteration": n_iter / args.iterations,
                    "syncs_finish_batch": n_finish,
                    "where_iterations": where_iter,
                    "where_finish_batch": where_finish,
                    "switches": {"autocast": args.autocast, "channels_last": args.channels_last},
                },
                f,
                indent=2,
            )
            f.write("\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
