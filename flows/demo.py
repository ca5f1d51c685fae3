"""`make demo`: D3S end to end on the real MNIST-5k digits, on CPU, into a run directory.

Runs the Prefect flow `d3s-distill` (flows/distill.py) on Prefect's ephemeral server (make
unsets PREFECT_API_URL), on the config configs/demo-mnist.json. Every artifact lands under the
root, checkpointed, so interrupting and re-running the command resumes where it stopped.

    python -m flows.demo [--root runs/demo-mnist] [--config configs/demo-mnist.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from flows.distill import distill
from storage.config import parse_config
from storage.fs import RunFS
from storage.run import read_results

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--root", default=str(REPO / "runs" / "demo-mnist"))
    ap.add_argument("--config", default=str(REPO / "configs" / "demo-mnist.json"))
    args = ap.parse_args(argv)
    cfg = parse_config(json.loads(Path(args.config).read_text()), args.config)
    print(f"D3S demo '{cfg.name}' on MNIST-5k (real digits), CPU, run root {args.root}")
    print("(re-running the command resumes an interrupted run)", flush=True)
    t0 = time.time()
    distill(root=args.root, config=cfg)
    fs = RunFS(args.root)
    results = read_results(fs, cfg.teachers.count)
    teachers = [meta["held_out_top1"] for meta in results["teachers"]]
    summary, base = results["summary"], results["baseline"]
    print(f"\nteachers (held-out top-1): {', '.join(f'{100 * a:.1f}%' for a in teachers)}")
    print(
        f"students on {summary['distilled_images']} distilled images: "
        f"{100 * summary['mean']:.1f} +- {100 * summary['std']:.1f}% top-1 "
        f"(n = {summary['students']})"
    )
    if base is not None:
        print(
            f"random real subset ({base['distilled_images']} real images, same ensemble labels, "
            f"same students): {100 * base['mean']:.1f} +- {100 * base['std']:.1f}% top-1"
        )
    print(f"artifacts: {args.root} (layout: docs/artifacts.md)")
    print(
        f"report:    {args.root}/report/report.md "
        "(with report/grid.png, the distilled images, and report/curves.png, the loss curves)"
    )
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
