"""The statistics pass on 1 vs 2 Dask workers, through the pipeline's own Dask path.

Each side runs the flow `d3s-stats-shards` (tasks/dask_stages.py) with prefect-dask's
DaskTaskRunner on a fresh LocalCluster of 1 or 2 single-threaded worker processes, over the
same shards of the same run: wall time from the subflow's start (cluster start-up included) to
its last shard on disk. Sides alternate, the shards are deleted between repeats; the ratio is
median(1 worker) / median(2 workers). Goal >= 1.6x on 2 cores. A third line times the same
shards in this process, one after another (torch with 1 thread), for reference.

Workload: ResNet-18 of the tiny-imagenet preset (64 px, 3x3 stem, 200 classes; random weights,
imported as the teacher: speed does not depend on them), `--images` synthetic images, batches of
`--batch`, `--shard-batches` batches per shard.

    env -u PREFECT_API_URL .venv/bin/python bench/bench_dask_stats.py
    env -u PREFECT_API_URL .venv/bin/python bench/bench_dask_stats.py --images 2000 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

GOAL = 1.6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=3200)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--shard-batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    tmp = Path(tempfile.mkdtemp(prefix="bench-dask-"))
    os.environ.setdefault("PREFECT_HOME", str(tmp / "prefect"))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

    from d3s_core.presets import get_preset
    from storage.config import DaskSpec, parse_config
    from storage.run import open_run
    from storage.states import weights_blob
    from tasks.dask_stages import on_dask, stats_plan_task, stats_shards_flow
    from tasks.stages import STAGES
    from tasks.stages.common import data_splits, load_teacher, new_model
    from tasks.stages.stats import compute_shard, select_layers

    torch.set_num_threads(1)
    torch.manual_seed(0)
    weights = tmp / "teacher.safetensors"
    weights.write_bytes(weights_blob(new_model(get_preset("tiny-imagenet")).state_dict()))
    cfg = parse_config(
        {
            "name": "bench-dask",
            "preset": "tiny-imagenet",
            "dataset": {"kind": "synthetic", "synthetic_size": args.images, "test_fraction": 0.05},
            "teachers": {"count": 1, "import_from": [str(weights)]},
            "stats": {
                "batch_size": args.batch,
                "workers": 0,
                "checkpoint_batches": args.shard_batches,
            },
        }
    )
    root = str(tmp / "run")
    with open_run(root, cfg) as run:
        STAGES["data"](run)
        STAGES["teachers"](run)
    c = cfg.model_dump(mode="json")
    todo = stats_plan_task.fn(root, c)
    print(
        f"torch {torch.__version__}, {os.cpu_count()} cores; ResNet-18 64 px, "
        f"{int(args.images * 0.95)} train images, batch {args.batch}, {len(todo)} shards"
    )

    def clear() -> None:
        import shutil

        shutil.rmtree(Path(root) / "stats_shards", ignore_errors=True)

    def on_workers(n: int) -> float:
        clear()
        t0 = time.perf_counter()
        done = on_dask(stats_shards_flow, DaskSpec(workers=n))(root, c, todo)
        elapsed = time.perf_counter() - t0
        assert len(done) == len(todo) and len({d["pid"] for d in done}) == n
        return elapsed

    def in_process() -> float:
        clear()
        with open_run(root, cfg) as run:
            train = data_splits(run)[0]
            model = load_teacher(run, 0)
            names = select_layers(model, cfg.stats.layers)
            t0 = time.perf_counter()
            for m, s in todo:
                compute_shard(run, model, names, train, m, s)
            return time.perf_counter() - t0

    one, two = [], []
    for r in range(args.repeats):
        for n, out in ((1, one), (2, two)) if r % 2 == 0 else ((2, two), (1, one)):
            out.append(on_workers(n))
            print(f"  repeat {r}: {n} worker(s) {out[-1]:.1f} s", flush=True)
    local = in_process()
    ratio = statistics.median(one) / statistics.median(two)
    paired = statistics.median(a / b for a, b in zip(one, two, strict=True))
    print(f"{'side':<34} {'median s':>9}")
    print(f"{'1 Dask worker (1 thread)':<34} {statistics.median(one):>9.1f}")
    print(f"{'2 Dask workers (1 thread each)':<34} {statistics.median(two):>9.1f}")
    print(f"{'in this process, 1 thread':<34} {local:>9.1f}")
    verdict = "met" if ratio >= GOAL else "NOT met"
    print(f"speed-up 2 vs 1 workers: {ratio:.2f}x (paired {paired:.2f}x); goal >= {GOAL}x", verdict)


if __name__ == "__main__":
    main()
