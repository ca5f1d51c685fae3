"""`make demo`: D3S end to end on the real MNIST-5k digits, on CPU, into a run directory.

The five stages run in order through the stage runners (tasks/stages): every artifact lands
under the root, checkpointed, so interrupting and re-running the command resumes where it
stopped. The Prefect flow, dashboards and report arrive with the pipeline issue; until then
this is what `make demo` runs.

    python -m flows.demo [--root runs/demo-mnist] [--config configs/demo-mnist.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from storage.config import parse_config
from storage.run import open_run, teacher_meta
from tasks.stages import STAGES

REPO = Path(__file__).resolve().parents[1]


class Printer:
    """Prints a line per stage at every tenth of the way."""

    def __init__(self) -> None:
        self.last: dict[str, int] = {}

    def __call__(self, stage: str, fraction: float, info: dict) -> None:
        step = int(fraction * 10)
        if step > self.last.get(stage, -1):
            self.last[stage] = step
            details = ", ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items()
            )
            print(f"  {stage:<10} {100 * fraction:5.1f}%  {details}", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--root", default=str(REPO / "runs" / "demo-mnist"))
    ap.add_argument("--config", default=str(REPO / "configs" / "demo-mnist.json"))
    args = ap.parse_args(argv)
    cfg = parse_config(json.loads(Path(args.config).read_text()), args.config)
    print(f"D3S demo '{cfg.name}' on MNIST-5k (real digits), CPU, run root {args.root}")
    print("(stage runners without Prefect for now; re-running resumes an interrupted run)")
    t0 = time.time()
    printer = Printer()
    with open_run(args.root, cfg) as run:
        for i, (name, stage) in enumerate(STAGES.items(), start=1):
            t = time.time()
            print(f"[{i}/{len(STAGES)}] {name}", flush=True)
            uri = stage(run, printer)
            print(f"  -> {uri} ({time.time() - t:.0f} s)", flush=True)
        teachers = [
            json.loads(run.fs.read_bytes(teacher_meta(m)))["held_out_top1"]
            for m in range(cfg.teachers.count)
        ]
        summary = json.loads(run.fs.read_bytes("validation/summary.json"))
    print(f"\nteachers (held-out top-1): {', '.join(f'{100 * a:.1f}%' for a in teachers)}")
    print(
        f"students on {summary['distilled_images']} distilled images: "
        f"{100 * summary['mean']:.1f} +- {100 * summary['std']:.1f}% top-1 "
        f"(n = {summary['students']})"
    )
    print(
        f"artifacts: {args.root} (layout: docs/artifacts.md); "
        f"images: {args.root}/synthesis/png/grid.png"
    )
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
