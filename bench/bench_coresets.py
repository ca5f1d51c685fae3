"""Cost of the coreset pass (tasks/stages/coreset.py: every training image through the coreset
teacher class by class, herding and k-center greedy per class) against one plain pass of the
same teacher over the same training images in the dataset's own order (`batches`, no grouping
by class, no selection), in the same process. Memory is stated from the shapes (one loader
batch, one class's features, against the whole feature matrix the pass never holds).

python bench/bench_coresets.py [--classes 20 --per-class 150 --size 32 --ipc 10]

Prints the two times, their ratio and the memory figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_profile import make_tree  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--per-class", type=int, default=150)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--ipc", type=int, default=10)
    args = ap.parse_args()

    import torch

    from d3s_core.coresets import penultimate_features
    from storage.config import parse_config
    from storage.run import open_run
    from tasks.stages import STAGES
    from tasks.stages.common import batches, data_splits, load_teacher
    from tasks.stages.coreset import CHUNK, select_coresets

    torch.set_num_threads(1)
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
                },
                "model": {"width": 8},
                "teachers": {"count": 1, "train": {"epochs": 1, "batch_size": 64}},
                "synthesis": {"ipc": args.ipc, "batch_size": 50},
                "stats": {"workers": 0},
                "validation": {"coresets": ["herding", "k-center"]},
            }
        )
        with open_run(Path(tmp) / "run", cfg) as run:
            STAGES["data"](run)
            STAGES["teachers"](run)
            train, _, _ = data_splits(run)
            teacher = load_teacher(run, 0)
            t0 = time.perf_counter()
            dim = 0
            for x, _ in batches(run, train, CHUNK):
                dim = penultimate_features(teacher, x).shape[1]
            plain = time.perf_counter() - t0
            t0 = time.perf_counter()
            select_coresets(run)
            coreset = time.perf_counter() - t0
        n = args.classes * args.per_class
        batch_bytes = CHUNK * 3 * args.size * args.size * 4
        out = {
            "train_images": n,
            "feature_dim": int(dim),
            "plain_teacher_pass_s": round(plain, 3),
            "coreset_pass_s": round(coreset, 3),
            "ratio": round(coreset / plain, 2),
            "one_loader_batch_MiB": round(batch_bytes / 2**20, 2),
            "one_class_features_MiB": round(args.per_class * dim * 12 / 2**20, 3),
            "whole_feature_matrix_MiB": round(n * dim * 4 / 2**20, 2),
        }
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
