"""Stage 2: one streaming pass over the training set, to per-layer mu and Sigma of every teacher
(Sec. 4.1, App. A.1).

Each image is decoded once and run through all M teachers. The pass is cut into shards of
`stats.checkpoint_batches` batches of the sequential order; each (teacher, shard)'s float64
sufficient statistics are a file of their own (the checkpoint), computed here in one pass
(one DataLoader, whose workers live for the whole pass) or by Dask workers in parallel, one
task per shard for all teachers missing it (tasks/dask_stages.py), and merged per teacher in a
pairwise tree (Chan's formula) when all are there."""

from __future__ import annotations

import math
from collections.abc import Callable, Sized
from contextlib import ExitStack
from functools import partial

import torch

from d3s_core.layers import FeatureHooks, select_layers
from d3s_core.loss import GaussianTarget, prepare_target
from d3s_core.precision import enable_cudnn_autotune, network_autocast
from d3s_core.stats import SuffStats, merge_tree
from storage.arrays import read_teacher_stats, write_teacher_stats
from storage.run import STATS, Run, teacher_weights
from storage.states import has_state, load_state, save_state

from ..terminal import Count
from .common import (
    Progress,
    data_splits,
    load_teacher,
    no_progress,
    sequential_batches,
    trimmed,
)
from .working_set import F32, F64, Phase, Work, phase


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


def by_shard(pairs: list[tuple[int, int]]) -> dict[int, list[int]]:
    """(teacher, shard) pairs as {shard: the teachers missing it}, shards ascending."""
    out: dict[int, list[int]] = {}
    for m, s in sorted(pairs, key=lambda p: (p[1], p[0])):
        out.setdefault(s, []).append(m)
    return out


Teachers = dict[int, tuple[torch.nn.Module, list[str]]]


def compute_shards(
    run: Run,
    teachers: Teachers,
    train,
    todo: dict[int, list[int]],
    on_batch: Callable[[int, int], None] | None = None,
) -> None:
    """Shards `todo` ({shard: teachers}) in one read of their batches: each batch is decoded
    once, by one DataLoader for the whole pass, and run through every teacher missing its
    shard (`teachers`: {m: (model, measured layer names)}). Shard s of teacher m covers
    batches [s * per, (s + 1) * per) of the sequential order and is written, as one file
    (atomic; safe without the run lock: no other file is touched), as soon as its last batch
    is done. `on_batch(b, s)` after batch b (of the whole order) of shard s."""
    cfg = run.config
    bs, per = cfg.stats.batch_size, cfg.stats.checkpoint_batches
    n_batches = math.ceil(len(train) / bs)
    todo = {s: ms for s, ms in sorted(todo.items()) if ms}
    ids = [b for s in todo for b in range(s * per, min((s + 1) * per, n_batches))]
    reduce = partial(SuffStats.from_batch, precision=cfg.stats.precision)
    acc: dict[int, list[SuffStats]] = {}
    with ExitStack() as stack, torch.no_grad():
        hooks = {
            m: stack.enter_context(FeatureHooks(model, names, reduce))
            for m, (model, names) in teachers.items()
            if any(m in ms for ms in todo.values())
        }
        # The heap is trimmed when the batches' churn piles up in it (common.trimmed).
        batches = trimmed(zip(ids, sequential_batches(run, train, bs, ids), strict=True))
        for b, (x, _) in batches:
            s = b // per
            for m in todo[s]:
                with network_autocast(x.device.type, cfg.stats.autocast):
                    teachers[m][0](x)
                parts = hooks[m].outputs
                acc[m] = (
                    [a.merge(p) for a, p in zip(acc[m], parts, strict=True)] if m in acc else parts
                )
            if on_batch is not None:
                on_batch(b, s)
            if b + 1 == min((s + 1) * per, n_batches):  # the shard's last batch
                for m in todo[s]:
                    stats = [(a.n, a.mean, a.m2) for a in acc.pop(m)]
                    save_state(
                        run.fs, shard_key(m, s), {"stats": stats}, {"layers": teachers[m][1]}
                    )


def compute_shard(
    run: Run,
    model: torch.nn.Module,
    names: list[str],
    train,
    m: int,
    s: int,
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Teacher m's statistics over shard s alone (compute_shards for one teacher and shard);
    `on_batch(i)` after the shard's i-th batch."""
    per = run.config.stats.checkpoint_batches
    done = None if on_batch is None else (lambda b, _s: on_batch(b - s * per + 1))
    compute_shards(run, {m: (model, names)}, train, {s: [m]}, done)


def load_shard(run: Run, m: int, s: int) -> list[SuffStats]:
    state, _ = load_state(run.fs, shard_key(m, s))
    return [SuffStats(n, mu, m2) for n, mu, m2 in state["stats"]]


def stats_working_set(w: Work) -> dict[str, Phase]:
    """The pass: the M teachers, a batch through them with its centred buffer, the float64
    accumulators (twice while merging); then one teacher's shards loaded for the merge."""
    s, f = w.cfg.stats, w.teacher
    m, st = w.cfg.teachers.count, w.stats_bytes(f.channels)
    centred = F64 if s.precision == "float64" else F32
    device = {
        "M x weights": m * f.weight_bytes,
        "batch x (image + forward + centred buffer)": s.batch_size
        * (w.chw * F32 + f.forward_live + f.largest_measured * centred // F32),
        "accumulators (M x layers x C^2 float64, x2 while merging)": 2 * m * st,
    }
    host = {**w.loader(s.batch_size), "shard write (2 copies)": 2 * st}
    merge = {"one teacher's shards loaded for the merge": w.shards * st, "merged + written": 2 * st}
    return {"pass": phase(host, device), "merge": phase(merge, {})}


def compute_stats(run: Run, progress: Progress = no_progress) -> str:
    """Every shard not yet on disk (computed here, or earlier by Dask workers), for all
    unfinished teachers in one pass over the data (compute_shards: each image decoded once
    for the M teachers); then per teacher a pairwise tree merge of its shards into stats.zarr.
    A killed pass loses at most the shards in progress."""
    cfg = run.config
    enable_cudnn_autotune(cfg.device)
    for m in range(cfg.teachers.count):  # a damaged or missing teacher is an error here too
        run.manifest.verify(teacher_weights(m))
    train, _, fingerprint = data_splits(run)
    assert isinstance(train, Sized)  # every split has a length (typed as a plain Dataset)
    n_shards = shard_count(run, len(train))
    unfinished = []
    for m in range(cfg.teachers.count):
        if run.manifest.is_recorded(_stats_key(m)):
            run.manifest.verify(_stats_key(m))
        else:
            unfinished.append(m)
    if not unfinished:
        return run.fs.url(STATS)
    todo = by_shard(missing_shards(run, len(train)))
    teachers: Teachers = {}
    for m in unfinished:
        model = load_teacher(run, m)
        teachers[m] = (model, select_layers(model, cfg.stats.layers))
    n_batches = math.ceil(len(train) / cfg.stats.batch_size)
    progress("stats", 0.0, {"batch": Count(0, n_batches), "teachers": len(unfinished)})

    def report(b: int, s: int) -> None:
        info = {"batch": Count(b + 1, n_batches), "shard": Count(s + 1, n_shards)}
        progress("stats", (b + 1) / n_batches, {**info, "teachers": len(todo[s])})

    compute_shards(run, teachers, train, todo, report)
    progress("stats", 1.0, {"batch": Count(n_batches, n_batches), "teachers": len(unfinished)})
    for m in unfinished:
        names = teachers[m][1]
        # Shards are read one at a time into the tree merge: O(log shards) held, not all.
        merged = merge_tree(
            (load_shard(run, m, s) for s in range(n_shards)),
            lambda a, b: [x.merge(y) for x, y in zip(a, b, strict=True)],
        )
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
