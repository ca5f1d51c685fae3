"""Stage 2: one streaming pass over the training set per teacher, to per-layer mu and Sigma
(Sec. 4.1, App. A.1).

The pass is cut into shards of `stats.checkpoint_batches` batches of the sequential order; each
shard's float64 sufficient statistics are a file of their own (the checkpoint), computed here
one after another or by Dask workers in parallel (tasks/dask_stages.py), and merged in a
pairwise tree (Chan's formula) when all are there."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch

from d3s_core.layers import FeatureHooks, select_layers
from d3s_core.loss import GaussianTarget, prepare_target
from d3s_core.precision import network_autocast
from d3s_core.stats import SuffStats, merge_all
from storage.arrays import read_teacher_stats, write_teacher_stats
from storage.run import STATS, Run, teacher_weights
from storage.states import has_state, load_state, save_state

from .common import Progress, batches, data_splits, load_teacher, no_progress


def _stats_key(m: int) -> str:
    return f"{STATS}/teacher_{m}"


def shard_key(m: int, s: int) -> str:
    """Teacher m's sufficient statistics over shard s (a safetensors state + JSON marker)."""
    return f"stats_shards/teacher_{m}/shard_{s:06d}"


def shard_count(run: Run, n_samples: int) -> int:
    bs, per = run.config.stats.batch_size, run.config.stats.checkpoint_batches
    n_batches = math.ceil(n_samples / bs)
    return math.ceil(n_batches / per)


def missing_shards(run: Run, n_samples: int) -> list[tuple[int, int]]:
    """(teacher, shard) pairs still to compute, for teachers whose statistics are unfinished."""
    out = []
    for m in range(run.config.teachers.count):
        if run.manifest.is_recorded(_stats_key(m)):
            continue
        out += [
            (m, s)
            for s in range(shard_count(run, n_samples))
            if not has_state(run.fs, shard_key(m, s))
        ]
    return out


def compute_shard(
    run: Run,
    model: torch.nn.Module,
    names: list[str],
    train,
    m: int,
    s: int,
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Teacher m's statistics over batches [s * per, (s + 1) * per) of the sequential order,
    written as one file (atomic; safe without the run lock: no other file is touched)."""
    cfg = run.config
    per = cfg.stats.checkpoint_batches
    reduce = partial(SuffStats.from_batch, precision=cfg.stats.precision)
    acc: list[SuffStats] = []
    with FeatureHooks(model, names, reduce) as hooks, torch.no_grad():
        shard = batches(run, train, cfg.stats.batch_size, None, s * per, (s + 1) * per)
        for i, (x, _) in enumerate(shard):
            with network_autocast(x.device.type, cfg.stats.autocast):
                model(x)
            parts = hooks.outputs
            acc = parts if not acc else [a.merge(b) for a, b in zip(acc, parts, strict=True)]
            if on_batch is not None:
                on_batch(i + 1)
    save_state(
        run.fs, shard_key(m, s), {"stats": [(a.n, a.mean, a.m2) for a in acc]}, {"layers": names}
    )


def load_shard(run: Run, m: int, s: int) -> list[SuffStats]:
    state, _ = load_state(run.fs, shard_key(m, s))
    return [SuffStats(n, mu, m2) for n, mu, m2 in state["stats"]]


def _report(progress: Progress, m: int, teachers: int, n_batches: int, before: int, i: int):
    done = before + i
    progress("stats", (m + done / n_batches) / teachers, {"teacher": m, "batch": done})


def compute_stats(run: Run, progress: Progress = no_progress) -> str:
    """Per teacher: every shard not yet on disk (computed here, or earlier by Dask workers),
    then a pairwise tree merge of the shards into stats.zarr. A killed pass loses at most the
    shard in progress."""
    cfg = run.config
    for m in range(cfg.teachers.count):  # a damaged or missing teacher is an error here too
        run.manifest.verify(teacher_weights(m))
    train, _, fingerprint = data_splits(run)
    n_shards = shard_count(run, len(train))
    todo = missing_shards(run, len(train))
    for m in range(cfg.teachers.count):
        if run.manifest.is_recorded(_stats_key(m)):
            run.manifest.verify(_stats_key(m))
            continue
        model = load_teacher(run, m)
        names = select_layers(model, cfg.stats.layers)
        n_batches = math.ceil(len(train) / cfg.stats.batch_size)
        per = cfg.stats.checkpoint_batches
        report = partial(_report, progress, m, cfg.teachers.count, n_batches)
        for s in range(n_shards):
            if (m, s) in todo:
                compute_shard(run, model, names, train, m, s, partial(report, s * per))
            report(min(n_batches, (s + 1) * per), 0)
        shards = [load_shard(run, m, s) for s in range(n_shards)]
        merged = [merge_all(list(layer)) for layer in zip(*shards, strict=True)]
        write_teacher_stats(
            run.fs, STATS, m, names, [(a.n, *a.mean_cov()) for a in merged], fingerprint
        )
        run.manifest.record(_stats_key(m), "stats")
        run.fs.remove(f"stats_shards/teacher_{m}", recursive=True)
    return run.fs.url(STATS)


def load_targets(
    run: Run, m: int, ridge: float, fingerprint: str
) -> tuple[list[str], list[GaussianTarget]]:
    """Teacher m's measured layers and Gaussians, verified against the manifest and checked to
    come from the dataset with `fingerprint`."""
    run.manifest.verify(_stats_key(m))
    data = read_teacher_stats(run.fs, STATS, m)
    if data["fingerprint"] != fingerprint:
        raise ValueError(
            f"{run.fs.url(_stats_key(m))}: statistics come from dataset "
            f"{data['fingerprint']!r}, this run's dataset is {fingerprint!r}"
        )
    device = run.config.device
    return data["layers"], [
        prepare_target(mu, cov, ridge).to(device) for _, mu, cov in data["stats"]
    ]
