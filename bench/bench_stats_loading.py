"""The statistics pass before and after issue 16 point 6, on CPU, as a ratio in one process.

Old (copied here from tasks/stages/stats.py before the change): per teacher, per shard, a new
DataLoader over a Subset of the ImageFolder dataset whose workers decode, resize, crop and
normalise to float32; M teachers = M decodes of every image, workers restarted every shard.
New (`tasks.stages.stats.compute_shards`): one DataLoader for the whole pass, workers ship
uint8 pixels, normalised in the main process (the run's device) after the copy, and each batch
goes through all M teachers.

Both sides write the same shard files (`stats_shards/teacher_{m}/shard_{s}`), checked equal
after the first repeat. Workload: `--images` random `--side` px (72) RGB PNGs in `--classes` class
folders of a temporary ImageFolder tree, read at 64 px (resize to 73, centre crop); `--teachers`
small_resnet models (width `--width`, low-res stem; the "tiny models" whose forward is cheap
next to decoding, the case loading bounds); batches of `--batch`, `--shard-batches` batches per
shard; torch with 1 thread. Sides alternate, shard files are deleted between repeats; the table
shows medians and the ratio old / new per `stats.workers` value.

    .venv/bin/python bench/bench_stats_loading.py
    .venv/bin/python bench/bench_stats_loading.py --images 640 --workers 0 2 4 --repeats 5
    .venv/bin/python bench/bench_stats_loading.py --side 320   # decoding dearer (ImageNet-like)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_tree(root: Path, images: int, classes: int, side: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / f"class_{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        # Smooth-ish content (a gradient plus noise): PNG decode cost like a photo's, not noise's.
        base = np.linspace(0, 200, side, dtype=np.float32)[None, :, None]
        img = base + rng.normal(0, 25, (side, side, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.png")


def old_pass(run, teachers, train) -> None:
    """tasks/stages/stats.py before the change: per teacher, per shard, its own DataLoader."""
    from d3s_core.layers import FeatureHooks
    from d3s_core.stats import SuffStats
    from storage.states import save_state
    from tasks.stages.stats import shard_count, shard_key

    cfg = run.config
    bs, per = cfg.stats.batch_size, cfg.stats.checkpoint_batches
    reduce = partial(SuffStats.from_batch, precision=cfg.stats.precision)
    for m, (model, names) in teachers.items():
        for s in range(shard_count(run, len(train))):
            sub = torch.utils.data.Subset(
                train, range(s * per * bs, min(len(train), (s + 1) * per * bs))
            )
            loader = torch.utils.data.DataLoader(
                sub, batch_size=bs, num_workers=cfg.stats.workers, pin_memory=False
            )
            acc: list[SuffStats] = []
            with FeatureHooks(model, names, reduce) as hooks, torch.no_grad():
                for x, _ in loader:
                    model(x)
                    parts = hooks.outputs
                    acc = (
                        parts if not acc else [a.merge(b) for a, b in zip(acc, parts, strict=True)]
                    )
            save_state(
                run.fs,
                shard_key(m, s),
                {"stats": [(a.n, a.mean, a.m2) for a in acc]},
                {"layers": names},
            )


def new_pass(run, teachers, train) -> None:
    from tasks.stages.stats import by_shard, compute_shards, missing_shards

    compute_shards(run, teachers, train, by_shard(missing_shards(run, len(train))))


def measure(root: Path, cfg, teachers, train, repeats: int) -> tuple[list[float], list[float]]:
    """(old times, new times), alternating which side goes first; the first repeat's shard
    files of both sides are checked equal (same batches, models and threads: the same bits)."""
    from storage.run import open_run
    from tasks.stages.stats import load_shard, shard_count

    with open_run(root, cfg) as run:
        n_shards = shard_count(run, len(train))

        def timed(fn) -> float:
            shutil.rmtree(root / "stats_shards", ignore_errors=True)
            t0 = time.perf_counter()
            fn(run, teachers, train)
            return time.perf_counter() - t0

        def shards() -> list:
            return [load_shard(run, m, s) for m in teachers for s in range(n_shards)]

        timed(new_pass)  # warm-up (page cache, allocator)
        times: dict = {old_pass: [], new_pass: []}
        results = {}
        for r in range(repeats):
            for fn in (old_pass, new_pass) if r % 2 == 0 else (new_pass, old_pass):
                times[fn].append(timed(fn))
                if r == 0:
                    results[fn] = shards()
        for a, b in zip(results[old_pass], results[new_pass], strict=True):
            for x, y in zip(a, b, strict=True):
                assert x.n == y.n and torch.equal(x.mean, y.mean) and torch.equal(x.m2, y.m2)
    return times[old_pass], times[new_pass]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--side", type=int, default=72, help="stored PNG side (read at 64 px)")
    ap.add_argument("--teachers", type=int, default=2)
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--shard-batches", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from d3s_core.layers import select_layers
    from d3s_core.models import build_model
    from d3s_core.presets import get_preset
    from storage.config import parse_config
    from storage.imagefolder import ImageFolderDataset

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-stats-loading-"))
    try:
        write_tree(tmp / "train", args.images, args.classes, args.side)
        p = get_preset("tiny-imagenet")
        train = ImageFolderDataset(tmp / "train", 64, 3, p.mean, p.std)
        teachers = {}
        for m in range(args.teachers):
            torch.manual_seed(m)
            model = build_model("small_resnet", args.classes, low_res=True, width=args.width)
            model = model.eval().requires_grad_(False)
            teachers[m] = (model, select_layers(model))
        print(
            f"torch {torch.__version__}, {os.cpu_count()} cores, 1 torch thread; "
            f"{args.images} PNGs {args.side} px read at 64 px; {args.teachers} small_resnet "
            f"(width {args.width}); batch {args.batch}, {args.shard_batches} batches a shard"
        )
        print(f"{'workers':>7} {'old s':>8} {'new s':>8} {'ratio':>7} {'paired':>7}")
        for w in args.workers:
            cfg = parse_config(
                {
                    "name": f"bench-w{w}",
                    "preset": "tiny-imagenet",
                    "teachers": {"count": args.teachers},
                    "stats": {
                        "batch_size": args.batch,
                        "workers": w,
                        "checkpoint_batches": args.shard_batches,
                    },
                }
            )
            old, new = measure(tmp / f"run-w{w}", cfg, teachers, train, args.repeats)
            ratio = statistics.median(old) / statistics.median(new)
            paired = statistics.median(a / b for a, b in zip(old, new, strict=True))
            print(
                f"{w:>7} {statistics.median(old):>8.2f} {statistics.median(new):>8.2f} "
                f"{ratio:>6.2f}x {paired:>6.2f}x",
                flush=True,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
