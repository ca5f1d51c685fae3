"""One ImageNet-21K-shaped run through every stage, measuring each stage's own costs.

Runs the stages in this process, one after the other (the same functions the Prefect flow
wraps, tasks/stages), on the `scale-21k` preset: 10,450 classes, IPC 10 (104,500 distilled
images in 523 synthesis batches of 200), synthetic training data of 16 px, a width-4 network,
so that compute is small and the pipeline's own costs show. For each stage it prints, as one
JSON document on stdout:

- peak_rss_mib: the process's peak resident memory during the stage (Linux: the high-water
  mark VmHWM, reset before the stage by writing 5 to /proc/self/clear_refs), and
  start_rss_mib, the resident memory when the stage started;
- seconds, units (batches, epochs, ...) and seconds per unit;
- disk_mib: bytes the stage added under the run root.

DataLoader workers are off (`stats.workers: 0`), so every byte a stage reads sits in this
process. Used by tests/test_scale.py (twice: a quarter of the images and all of them, to show
that memory does not grow with the set) and bench/bench_scale.py.

    .venv/bin/python bench/scale_probe.py --root /tmp/scale --ipc 10 --label-epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_mib(field: str) -> float:
    """VmRSS or VmHWM of this process in MiB (/proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Set the peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def preset_name(args: argparse.Namespace) -> str:
    return (
        "scale-21k"
        if (args.size, args.classes) == (16, 10450)
        else (f"scale-{args.classes}c-{args.size}px")
    )


def register_preset(args: argparse.Namespace) -> None:
    """The scale-21k preset at another image size or class count (in this process only)."""
    from dataclasses import replace

    from d3s_core.presets import PRESETS

    name = preset_name(args)
    if name not in PRESETS:
        PRESETS[name] = replace(
            PRESETS["scale-21k"], name=name, image_size=args.size, num_classes=args.classes
        )


def forbid_whole_sets() -> None:
    """The readers that return a whole image set or a whole label epoch raise from here on
    (set before the stages are imported, so a stage that imports them gets these): at tiny
    image sizes a whole set is too small to show in the resident memory."""
    import storage.arrays
    import storage.labels

    def refuse(name: str):
        def reader(*args, **kwargs):
            raise AssertionError(f"a stage called {name}, which holds a whole set in memory")

        return reader

    storage.arrays.read_images = refuse("storage.arrays.read_images")  # type: ignore[assignment]
    storage.labels.read_epoch = refuse("storage.labels.read_epoch")  # type: ignore[assignment]


def scale_config(args: argparse.Namespace) -> dict:
    train_per_class = args.ipc + 3  # 20% held out leaves >= IPC per class for the baseline
    return {
        "name": f"scale-{args.classes}x{args.ipc}",
        "preset": preset_name(args),
        "seed": 0,
        "dataset": {
            "kind": "synthetic",
            "synthetic_size": args.classes * train_per_class,
            "test_fraction": 0.2,
        },
        "teachers": {"count": 1, "train": {"epochs": 1, "batch_size": 1024}},
        "stats": {"batch_size": 1024, "workers": 0, "checkpoint_batches": 50},
        "synthesis": {
            "ipc": args.ipc,
            "batch_size": 200,
            "checkpoint_every": 1,
            "checkpoint_seconds": args.checkpoint_seconds,
            "params": {"iterations": args.iterations},
        },
        "labels": {"epochs": args.label_epochs, "batch_size": 200, "format": args.label_format},
        "validation": {
            "students": 1,
            "epochs": args.student_epochs,
            "checkpoint_every_epochs": 1,
            "random_real_baseline": True,
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True)
    ap.add_argument("--classes", type=int, default=10450)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--size", type=int, default=16, help="image side in pixels (3 channels)")
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--label-epochs", type=int, default=2)
    ap.add_argument("--label-format", default="topk")
    ap.add_argument("--student-epochs", type=int, default=1)
    ap.add_argument("--checkpoint-seconds", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--forbid-whole-sets",
        action="store_true",
        help="make the whole-set readers (read_images, read_epoch) raise in the stages",
    )
    ap.add_argument(
        "--live-memory",
        action="store_true",
        help="fix glibc's mmap threshold at 128 KiB in this probe process, so that its resident "
        "memory follows what the stages hold rather than what the allocator keeps (at "
        "ImageNet-21K shape under glibc's default policy the statistics pass, which does not "
        "depend on the IPC, peaked 131 MiB higher at IPC 10 than at IPC 2, measured); the "
        "stages themselves never set it",
    )
    args = ap.parse_args(argv)
    if args.live_memory:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD

    import torch

    torch.set_num_threads(args.threads)
    register_preset(args)
    if args.forbid_whole_sets:
        forbid_whole_sets()
    from storage.config import parse_config
    from storage.run import open_run
    from tasks.stages import EXTRA_STAGES, STAGES
    from tasks.stages.common import trim_heap

    root = Path(args.root)
    cfg = parse_config(scale_config(args))
    n_images = args.classes * args.ipc
    units = {
        "data": ("passes", 1),
        "teachers": ("epochs", 1),
        "stats": ("batches", -(-cfg.dataset.synthetic_size * 4 // 5 // 1024)),
        "synthesis": ("batches", -(-n_images // 200)),
        "labels": ("epochs", args.label_epochs),
        "validation": ("student epochs", args.student_epochs),
        "baseline": ("label + student epochs", args.label_epochs + args.student_epochs),
    }
    report = {
        "classes": args.classes,
        "ipc": args.ipc,
        "images": n_images,
        "image_size": cfg.preset_obj().image_size,
        "config": scale_config(args),
        "process_rss_mib": rss_mib("VmRSS"),
        "stages": {},
    }
    with open_run(root, cfg) as run:
        for name, fn in {**STAGES, "baseline": EXTRA_STAGES["baseline"]}.items():
            before = tree_bytes(root)
            # Each stage from a trimmed heap, as in a process of its own: what an earlier stage
            # freed but the allocator kept is not this stage's (tasks/stages/common.trim_heap).
            trim_heap()
            start_rss = rss_mib("VmRSS")
            reset_peak()
            t0 = time.perf_counter()
            fn(run)
            seconds = time.perf_counter() - t0
            unit, count = units[name]
            report["stages"][name] = {
                "peak_rss_mib": round(rss_mib("VmHWM"), 1),
                "start_rss_mib": round(start_rss, 1),
                "seconds": round(seconds, 3),
                "unit": unit,
                "units": count,
                "seconds_per_unit": round(seconds / max(1, count), 4),
                "disk_mib": round((tree_bytes(root) - before) / 2**20, 2),
            }
            print(f"{name}: {report['stages'][name]}", file=sys.stderr, flush=True)
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    raise SystemExit(main())
