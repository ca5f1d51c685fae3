"""`make demo`: D3S end to end on the real MNIST-5k digits, on CPU, into a run directory.

Runs the Prefect flow `d3s-distill` (flows/distill.py) on Prefect's ephemeral server (make
unsets PREFECT_API_URL), on the config configs/demo-mnist.json. Every artifact lands under the
root, checkpointed, so interrupting and re-running the command resumes where it stopped.

    python -m flows.demo [--root runs/demo-mnist] [--config configs/demo-mnist.json]

It validates D3S and the random real subset under both protocols (soft labels and hard
labels). `make demo-baselines` adds herding, k-center and a full-data student
(configs/demo-mnist-baselines.json, into runs/demo-mnist-baselines/).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from flows.cli import headline
from flows.distill import distill
from storage.config import parse_config

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
    print()
    for line in headline(args.root, cfg):  # what `d3s run` prints: both protocols' scores
        print(line)
    print(f"artifacts   {args.root} (layout: docs/artifacts.md)")
    print("            report/grid.png: the distilled images; report/curves.png: the loss curves")
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
