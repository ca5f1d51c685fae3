"""The embarrassingly parallel passes on Dask, through prefect-dask's DaskTaskRunner: the
statistics shards (one task per shard of the dataset, for every teacher missing it: each image
decoded once) and the label epochs.

Workers write only their own files, atomically (a shard's state, an epoch's Parquet file), and
take no lock. The flow process holds the run's lock; after the workers, the usual stage task
(tasks/stages) merges the shards in a tree / checks and records the epochs, and does whatever a
worker left undone. A worker killed mid-shard loses that shard only.

The cluster: an existing scheduler (`dask.address` in the config) or, by default, a
LocalCluster of `dask.workers` processes listening on 127.0.0.1.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Sized
from typing import Any
from uuid import UUID

import torch
from prefect import flow, task, unmapped
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect_dask import DaskTaskRunner

from d3s_core.layers import select_layers
from storage.config import DaskSpec, RunConfig, parse_config
from storage.run import Run, attach_run

from .credentials import storage_options
from .retry import retry_on_transient_io
from .stages.common import data_splits, load_teacher
from .stages.labels import missing_epochs, write_one_epoch
from .stages.stats import by_shard, compute_shards, missing_shards, shard_key


def dask_task_runner(spec: DaskSpec) -> DaskTaskRunner:
    if spec.address:
        return DaskTaskRunner(address=spec.address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": spec.workers,
            "threads_per_worker": spec.threads_per_worker,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": "127.0.0.1:0",
        },
    )


# Per worker process: the run, its training split and the teachers, opened once and reused by
# every task the worker runs (an ImageFolder scan of a large tree is not repeated per shard).
_cache: dict[Any, Any] = {}
_cache_lock = threading.Lock()


def _cached(key: Any, make):
    with _cache_lock:
        if key not in _cache:
            _cache[key] = make()
        return _cache[key]


def _worker_run(root: str, cfg: RunConfig) -> Run:
    torch.set_num_threads(cfg.dask.threads_per_worker if cfg.dask else 1)
    return _cached(
        ("run", root, cfg.config_hash()), lambda: attach_run(root, cfg, **storage_options(cfg))
    )


_io_retries: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": [5, 30, 120],
    "retry_condition_fn": retry_on_transient_io,
}


@task(name="stats-shard", task_run_name="stats-shard-{s}", **_io_retries)
def stats_shard_task(
    root: str, config: dict[str, Any], s: int, teachers: list[int]
) -> dict[str, Any]:
    """Shard s of the statistics pass for `teachers` (those missing it): each batch decoded
    once and run through all of them; one file per (teacher, shard) as in the flow process."""
    cfg = parse_config(config)
    run = _worker_run(root, cfg)
    key = (root, cfg.config_hash())
    train = _cached(("train", *key), lambda: data_splits(run)[0])
    models = {}
    for m in teachers:
        model = _cached(("teacher", *key, m), lambda m=m: load_teacher(run, m))
        models[m] = (model, select_layers(model, cfg.stats.layers))
    compute_shards(run, models, train, {s: list(teachers)})
    return {
        "shard": s,
        "files": [run.fs.url(shard_key(m, s)) for m in teachers],
        "pid": os.getpid(),
    }


@task(name="labels-epoch", task_run_name="labels-epoch{e}", **_io_retries)
def labels_epoch_task(
    root: str, config: dict[str, Any], e: int, prefix: str = ""
) -> dict[str, Any]:
    """Epoch e's labels, the images of each label batch streamed from the store (the worker
    keeps only its teachers between tasks, never the image set)."""
    cfg = parse_config(config)
    run = _worker_run(root, cfg)
    key = (root, cfg.config_hash())
    teachers = [
        _cached(("teacher", *key, m), lambda m=m: load_teacher(run, m))
        for m in range(cfg.teachers.count)
    ]
    # Dask's worker processes are daemonic (distributed.worker.daemon) and may not start
    # DataLoader processes: the rows are then read in the task's own thread.
    workers = 0 if multiprocessing.current_process().daemon else cfg.stats.workers
    write_one_epoch(run, None, teachers, e, prefix, workers=workers)
    return {"epoch": e, "pid": os.getpid()}


def _gather(futures: list, what: str) -> list:
    """Results as they complete, with a progress artifact that moves."""
    done, out = 0, []
    art = create_progress_artifact(0.0, description=f"{what} on Dask: 0/{len(futures)}")
    assert isinstance(art, UUID)  # called synchronously (typed UUID | Coroutine)
    for fut in as_completed(futures):
        out.append(fut.result())
        done += 1
        update_progress_artifact(
            art, 100 * done / len(futures), description=f"{what} on Dask: {done}/{len(futures)}"
        )
    return out


@task(name="stats-plan")
def stats_plan_task(root: str, config: dict[str, Any]) -> list[tuple[int, int]]:
    """(teacher, shard) pairs still to compute."""
    cfg = parse_config(config)
    run = attach_run(root, cfg, **storage_options(cfg))
    train, _, _ = data_splits(run)
    assert isinstance(train, Sized)  # every split has a length (typed as a plain Dataset)
    return missing_shards(run, len(train))


@task(name="labels-plan")
def labels_plan_task(root: str, config: dict[str, Any], prefix: str = "") -> list[int]:
    cfg = parse_config(config)
    return missing_epochs(attach_run(root, cfg, **storage_options(cfg)), prefix)


@flow(name="d3s-stats-shards")
def stats_shards_flow(
    root: str, config: dict[str, Any], todo: list[tuple[int, int]]
) -> list[dict[str, Any]]:
    """Compute the given (teacher, shard) statistics on the Dask cluster, one task per shard
    for all its teachers; returns {shard, files, pid} per shard."""
    shards = by_shard([(m, s) for m, s in todo])
    futures = stats_shard_task.map(root, unmapped(config), list(shards), list(shards.values()))
    return _gather(list(futures), "statistics shards")


@flow(name="d3s-label-epochs")
def label_epochs_flow(
    root: str, config: dict[str, Any], todo: list[int], prefix: str = ""
) -> list[dict[str, Any]]:
    """Label the given epochs on the Dask cluster; returns {epoch, pid} each."""
    futures = labels_epoch_task.map(root, unmapped(config), todo, unmapped(prefix))
    return _gather(list(futures), "label epochs")


def on_dask(subflow, spec: DaskSpec):
    """The subflow with a DaskTaskRunner for this config's cluster."""
    return subflow.with_options(task_runner=dask_task_runner(spec))


def stats_fanout(root: str, config: RunConfig, wait_for: list[Any]) -> None:
    """The statistics stage's Dask part (tasks/stage_table.py): the shards still to compute,
    on the cluster; the stage's own task then merges them."""
    c = config.model_dump(mode="json")
    todo = stats_plan_task(root, c, wait_for=wait_for)
    if todo and config.dask is not None:
        on_dask(stats_shards_flow, config.dask)(root, c, todo)


def labels_fanout(root: str, config: RunConfig, wait_for: list[Any]) -> None:
    """The labels stage's Dask part: the label epochs still to write, on the cluster; the
    stage's own task then checks and records them."""
    c = config.model_dump(mode="json")
    epochs = labels_plan_task(root, c, wait_for=wait_for)
    if epochs and config.dask is not None:
        on_dask(label_epochs_flow, config.dask)(root, c, epochs)
