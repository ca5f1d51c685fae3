"""Cost of finding a dataset's profile (tasks/stages/profile.py: classes, header pass for
channels/size, exact pixel moments for mean/std) against one plain pass over the same training
images as the stages read them (decode, resize, normalise: what a teacher epoch or the stats
pass pays per image), in the same process.

python bench/bench_profile.py [--classes 10 --per-class 200 --size 64]

Prints the two times and their ratio; `--samples N` caps the inspected images
(dataset.profile_samples) to show the cost of a sampled profile on a larger set.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_tree(root: Path, classes: int, per_class: int, size: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for c in range(classes):
            d = root / split / f"c{c:04d}"
            d.mkdir(parents=True)
            for i in range(n):
                px = rng.integers(0, 256, size=(size, size + 7, 3), dtype=np.uint8)
                Image.fromarray(px, "RGB").save(d / f"{i}.jpg", quality=90)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=100_000)
    args = ap.parse_args()

    from storage.config import parse_config
    from storage.run import open_run
    from tasks.stages import open_data
    from tasks.stages.common import batches, data_splits
    from tasks.stages.recipe import data_profile

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_tree(data, args.classes, args.per_class, args.size)
        cfg = parse_config(
            {
                "preset": "tiny-imagenet",
                "dataset": {
                    "kind": "imagefolder",
                    "path": str(data / "train"),
                    "val_path": str(data / "val"),
                    "profile_samples": args.samples,
                },
                "stats": {"workers": 0},
            }
        )
        # A first run warms the page cache and the imports; the second run's profile (index,
        # header pass, moments) is timed against a plain pass over the same images.
        with open_run(Path(tmp) / "warm", cfg) as run:
            open_data(run)
        with open_run(Path(tmp) / "run", cfg) as run:
            t0 = time.perf_counter()
            open_data(run)  # the data stage: index, header pass, moments
            profile = data_profile(run)
            t_profile = time.perf_counter() - t0
            train, _, _ = data_splits(run)
            t0 = time.perf_counter()
            n = sum(len(y) for _, y in batches(run, train, 256))
            t_pass = time.perf_counter() - t0
    out = {
        "train_images": n,
        "inspected": profile["inspected"]["images"],
        "profile_s": round(t_profile, 3),
        "one_pass_s": round(t_pass, 3),
        "profile_over_one_pass": round(t_profile / t_pass, 3),
        "values": profile["values"],
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
