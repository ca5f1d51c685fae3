"""Statistics shards (one task per shard, for every teacher) and label epochs on a real Dask
LocalCluster (worker processes), through prefect-dask's DaskTaskRunner: equal to the
single-process results."""

import json
import os
from functools import partial

import pytest
import torch

from d3s_core.layers import FeatureHooks, select_layers
from d3s_core.stats import SuffStats
from storage.arrays import read_teacher_stats
from storage.config import parse_config
from storage.fs import RunFS
from storage.manifest import Manifest
from storage.run import STATS, open_run
from tasks.stages import STAGES
from tasks.stages.common import batches, data_splits, load_teacher

from .configs import SMALL

# Several shards per teacher (batch 16 of 160 images = 10 batches, 2 per shard) and per worker.
DASK = {
    **SMALL,
    "dataset": {"kind": "synthetic", "synthetic_size": 160},
    "stats": {"batch_size": 16, "workers": 0, "checkpoint_batches": 2},
    "labels": {"epochs": 4, "batch_size": 10},
}


def sequential_reference(run, m):
    """One pass over every batch in order, merged one batch at a time (no shards)."""
    model = load_teacher(run, m)
    names = select_layers(model, run.config.stats.layers)
    train = data_splits(run)[0]
    acc = []
    reduce = partial(SuffStats.from_batch, precision=run.config.stats.precision)
    with FeatureHooks(model, names, reduce) as hooks, torch.no_grad():
        for x, _ in batches(run, train, run.config.stats.batch_size):
            model(x)
            parts = hooks.outputs
            acc = parts if not acc else [a.merge(b) for a, b in zip(acc, parts, strict=True)]
    return [a.mean_cov() for a in acc]


def checksums(root):
    return {k: v["sha256"] for k, v in Manifest(RunFS(root)).entries().items()}


@pytest.mark.timeout(600)
def test_flow_on_dask_equals_the_single_process_flow(prefect_server, tmp_path):
    from flows.distill import distill
    from tasks.dask_stages import on_dask, stats_plan_task, stats_shards_flow

    torch.set_num_threads(1)
    plain = parse_config({**DASK, "name": "plain"})
    on = parse_config({**DASK, "name": "plain", "dask": {"workers": 2}})
    assert plain.config_hash() == on.config_hash()

    # The statistics shards alone, on two worker processes.
    root = str(tmp_path / "dask")
    with open_run(root, on) as run:
        STAGES["data"](run)
        STAGES["teachers"](run)
    c = on.model_dump(mode="json")
    todo = stats_plan_task(root, c)
    assert len(todo) == 2 * 5
    done = on_dask(stats_shards_flow, on.dask)(root, c, todo)
    pids = {d["pid"] for d in done}
    # One task per shard, for both teachers (each batch decoded once).
    assert sorted(d["shard"] for d in done) == list(range(5))
    assert all(len(d["files"]) == 2 for d in done)
    assert os.getpid() not in pids and len(pids) == 2
    with open_run(root, on) as run:
        STAGES["stats"](run)  # merges the workers' shards
        for m in range(2):
            ref = sequential_reference(run, m)
            got = read_teacher_stats(run.fs, STATS, m)["stats"]
            for (mu_r, cov_r), (_, mu, cov) in zip(ref, got, strict=True):
                scale = cov_r.abs().max()
                assert (mu - mu_r).abs().max() <= 1e-10 * mu_r.abs().max().clamp_min(1)
                assert (cov - cov_r).abs().max() <= 1e-10 * scale

    # The whole flow with Dask (labels on workers too) equals the whole flow without.
    state = distill(root=root, config=on, return_state=True)
    assert state.is_completed()
    reference = str(tmp_path / "plain")
    assert distill(root=reference, config=plain, return_state=True).is_completed()
    assert checksums(root) == checksums(reference)
    assert len([k for k in checksums(root) if k.startswith("labels/")]) == 4


@pytest.mark.slow  # labels on workers, end to end: test_flow_on_dask_equals_the_single_process_flow
def test_label_epochs_on_workers_are_recorded_by_the_stage(prefect_server, tmp_path):
    from tasks.dask_stages import label_epochs_flow, labels_plan_task, on_dask

    torch.set_num_threads(1)
    cfg = parse_config({**DASK, "name": "labels", "dask": {"workers": 2}})
    root = str(tmp_path / "run")
    with open_run(root, cfg) as run:
        for stage in ("data", "teachers", "stats", "synthesis"):
            STAGES[stage](run)
    c = cfg.model_dump(mode="json")
    assert labels_plan_task(root, c) == [0, 1, 2, 3]
    done = on_dask(label_epochs_flow, cfg.dask)(root, c, [1, 3])  # two on workers
    assert sorted(d["epoch"] for d in done) == [1, 3]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert not any(k.startswith("labels/") for k in manifest["artifacts"])  # workers record nothing
    with open_run(root, cfg) as run:
        STAGES["labels"](run)  # records 1 and 3, labels 0 and 2 itself
    reference = str(tmp_path / "ref")
    with open_run(reference, cfg) as run:
        for stage in ("data", "teachers", "stats", "synthesis", "labels"):
            STAGES[stage](run)
    labels = {k: v for k, v in checksums(root).items() if k.startswith("labels/")}
    assert len(labels) == 4
    assert labels == {k: v for k, v in checksums(reference).items() if k.startswith("labels/")}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_existing_cluster_by_address(prefect_server, tmp_path):
    """`dask scheduler` + `dask worker` started from the command line, named in the config."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from distributed import Client

    from tasks.dask_stages import on_dask, stats_plan_task, stats_shards_flow

    from .live_server import free_port

    bin_dir = Path(sys.executable).parent
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [
        subprocess.Popen(
            [
                bin_dir / "dask",
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--dashboard-address",
                "127.0.0.1:0",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        ),
        subprocess.Popen(
            [
                bin_dir / "dask",
                "worker",
                address,
                "--nworkers",
                "2",
                "--nthreads",
                "1",
                "--host",
                "127.0.0.1",
                "--dashboard-address",
                "127.0.0.1:0",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        ),
    ]
    try:
        deadline = time.time() + 60
        while True:
            try:
                with Client(address, timeout=5) as client:
                    client.wait_for_workers(2, timeout=60)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(1)
        cfg = parse_config({**DASK, "name": "addr", "dask": {"address": address}})
        root = str(tmp_path / "run")
        with open_run(root, cfg) as run:
            STAGES["data"](run)
            STAGES["teachers"](run)
        c = cfg.model_dump(mode="json")
        done = on_dask(stats_shards_flow, cfg.dask)(root, c, stats_plan_task(root, c))
        assert len(done) == 5 and os.getpid() not in {d["pid"] for d in done}
        with open_run(root, cfg) as run:
            STAGES["stats"](run)
            assert run.manifest.is_recorded("stats.zarr/teacher_1")
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            p.wait(timeout=30)
