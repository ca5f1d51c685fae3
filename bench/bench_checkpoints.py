"""Synthesis checkpoint writes against `synthesis.checkpoint_seconds`: how much is written and
how much work a kill can lose.

Prepares one run (demo-mnist preset on synthetic digits, 1 teacher), then runs the synthesis
stage from scratch once per setting, counting the checkpoints written (bytes of their tensor
files), the images written, the stage's seconds, and the longest stretch of iterating between
two saved points (a batch's start, a checkpoint, a commit): the work a kill -9 can lose.

    .venv/bin/python bench/bench_checkpoints.py --seconds 0 5 --iterations 200
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def config(seconds: float, iterations: int, every: int) -> dict:
    return {
        "name": "bench-checkpoints",
        "preset": "demo-mnist",
        "dataset": {"kind": "synthetic", "synthetic_size": 400},
        "teachers": {"count": 1, "train": {"epochs": 1}},
        "stats": {"batch_size": 100, "workers": 0},
        "synthesis": {
            "ipc": 10,
            "batch_size": 50,
            "checkpoint_every": every,
            "checkpoint_seconds": seconds,
            "params": {"iterations": iterations},
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, nargs="+", default=[0.0, 5.0])
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--every", type=int, default=10)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    import tasks.stages.synthesis as syn
    from storage.config import parse_config
    from storage.run import SYN_IMAGES, open_run
    from tasks.stages import compute_stats, open_data, train_teachers

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        first = parse_config(config(args.seconds[0], args.iterations, args.every))
        with open_run(base, first) as run:
            open_data(run)
            train_teachers(run)
            compute_stats(run)
        print(
            f"{'checkpoint_seconds':>18} {'checkpoints':>11} {'ckpt MiB':>9} {'images MiB':>10} "
            f"{'ckpt/images':>11} {'stage s':>8} {'longest unsaved s':>17}"
        )
        for seconds in args.seconds:
            root = Path(tmp) / f"run-{seconds}"
            shutil.copytree(base, root)
            saved_bytes, marks = [0], [time.perf_counter()]
            real_save = syn.BackgroundSaver.save

            def save(
                self,
                rel,
                state,
                meta=None,
                saved_bytes=saved_bytes,
                marks=marks,
                real_save=real_save,
            ):
                saved_bytes[0] += sum(t.numel() * t.element_size() for t in state.values())
                marks.append(time.perf_counter())
                return real_save(self, rel, state, meta)

            real_write = syn.write_image_batch

            def write(*a, marks=marks, real_write=real_write, **k):
                marks.append(time.perf_counter())  # a commit follows: a saved point
                return real_write(*a, **k)

            syn.BackgroundSaver.save = save  # type: ignore[method-assign]
            syn.write_image_batch = write
            try:
                cfg = parse_config(config(seconds, args.iterations, args.every))
                with open_run(root, cfg) as run:
                    marks[0] = t0 = time.perf_counter()
                    syn.synthesize(run)
                    stage = time.perf_counter() - t0
                    images = run.fs.tree_bytes(SYN_IMAGES)
            finally:
                syn.BackgroundSaver.save = real_save  # type: ignore[method-assign]
                syn.write_image_batch = real_write
            gaps = [b - a for a, b in zip(marks, marks[1:], strict=False)]
            n = len(marks) - 1 - 2  # minus the two batches' commits
            print(
                f"{seconds:>18g} {n:>11} {saved_bytes[0] / 2**20:>9.2f} {images / 2**20:>10.2f} "
                f"{saved_bytes[0] / max(1, images):>11.2f} {stage:>8.1f} {max(gaps):>17.1f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
