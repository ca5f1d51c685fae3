"""Each stage's peak RSS, time per unit and disk written against the number of distilled images.

Runs bench/scale_probe.py (every stage, in a fresh process per point, DataLoader workers off)
at each point CLASSES:IPC:SIZE and prints one table row per (point, stage), then the ratio of
each stage's peak RSS at the largest point to the smallest of the same image size. A stage
whose memory does not depend on the number of images has a ratio near 1.

    .venv/bin/python bench/bench_scale.py                       # 21K shape and a quarter, 16 px
    .venv/bin/python bench/bench_scale.py --points 1000:1:224 1000:4:224 --label-epochs 1

Peak RSS counts this process only (the stage runs in it); time per unit is wall-clock on this
machine and moves with its load: compare rows of one invocation, not across machines.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_POINTS = ["2613:10:16", "10450:10:16"]  # a quarter of ImageNet-21K's images, and all


def probe(point: str, label_epochs: int, student_epochs: int, work: Path) -> dict:
    classes, ipc, size = (int(v) for v in point.split(":"))
    root = work / f"run-{classes}-{ipc}-{size}"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "scale_probe.py"),
        "--root",
        str(root),
        "--classes",
        str(classes),
        "--ipc",
        str(ipc),
        "--size",
        str(size),
        "--label-epochs",
        str(label_epochs),
        "--student-epochs",
        str(student_epochs),
    ]
    out = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", nargs="+", default=DEFAULT_POINTS, help="CLASSES:IPC:SIZE")
    ap.add_argument("--label-epochs", type=int, default=2)
    ap.add_argument("--student-epochs", type=int, default=1)
    ap.add_argument("--json", help="also write the probes' reports here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        reports = [probe(p, args.label_epochs, args.student_epochs, Path(tmp)) for p in args.points]
    print(
        f"{'images':>8} {'px':>4} {'stage':<11} {'peak RSS MiB':>12} {'start MiB':>9} "
        f"{'s/unit':>8} {'unit':<22} {'disk MiB':>9}"
    )
    for r in reports:
        for name, s in r["stages"].items():
            print(
                f"{r['images']:>8} {r['image_size']:>4} {name:<11} {s['peak_rss_mib']:>12.1f} "
                f"{s['start_rss_mib']:>9.1f} {s['seconds_per_unit']:>8.3f} {s['unit']:<22} "
                f"{s['disk_mib']:>9.2f}"
            )
    for size in sorted({r["image_size"] for r in reports}):
        group = sorted((r for r in reports if r["image_size"] == size), key=lambda r: r["images"])
        if len(group) < 2:
            continue
        lo, hi = group[0], group[-1]
        print(f"\n{size} px: {hi['images']} vs {lo['images']} images, peak RSS ratio per stage")
        for name in hi["stages"]:
            a, b = lo["stages"][name]["peak_rss_mib"], hi["stages"][name]["peak_rss_mib"]
            print(f"  {name:<11} {b / a:.3f}  ({a:.0f} -> {b:.0f} MiB)")
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
