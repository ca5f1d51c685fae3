"""Stage 2: one streaming pass over the training set per teacher, to per-layer mu and Sigma
(Sec. 4.1, App. A.1), checkpointed every `checkpoint_batches` batches."""

from __future__ import annotations

from functools import partial

import torch

from d3s_core.layers import FeatureHooks, select_layers
from d3s_core.loss import GaussianTarget, prepare_target
from d3s_core.stats import SuffStats
from storage.arrays import read_teacher_stats, write_teacher_stats
from storage.run import STATS, Run
from storage.states import has_state, load_state, remove_state, save_state

from .common import Progress, batches, data_splits, load_teachers, no_progress


def _stats_key(m: int) -> str:
    return f"{STATS}/teacher_{m}"


def compute_stats(run: Run, progress: Progress = no_progress) -> str:
    cfg = run.config
    teachers = load_teachers(run)
    train, _, fingerprint = data_splits(run)
    loader = torch.utils.data.DataLoader(
        train,
        batch_size=cfg.stats.batch_size,
        shuffle=False,
        num_workers=cfg.stats.workers,
        persistent_workers=False,
        pin_memory=cfg.device.startswith("cuda"),
    )
    total = len(loader)
    for m, model in enumerate(teachers):
        if run.manifest.is_recorded(_stats_key(m)):
            run.manifest.verify(_stats_key(m))
            continue
        names = select_layers(model, cfg.stats.layers)
        ckpt = f"stats_checkpoints/teacher_{m}"
        acc: list[SuffStats] = []
        done = 0
        if has_state(run.fs, ckpt):
            state, _ = load_state(run.fs, ckpt)
            done = state["batches"]
            acc = [SuffStats(n, mu, m2) for n, mu, m2 in state["stats"]]
        precision = cfg.stats.precision
        reduce = partial(SuffStats.from_batch, precision=precision)
        with FeatureHooks(model, names, reduce) as hooks, torch.no_grad():
            # The order is sequential, so a resumed pass starts at the next unseen batch.
            for i, (x, _) in enumerate(batches(run, train, cfg.stats.batch_size, None, done), done):
                model(x)
                parts = hooks.outputs
                acc = parts if not acc else [a.merge(b) for a, b in zip(acc, parts, strict=True)]
                done = i + 1
                if done % cfg.stats.checkpoint_batches == 0 and done < total:
                    save_state(
                        run.fs, ckpt, {"batches": done, "stats": [(s.n, s.mean, s.m2) for s in acc]}
                    )
                progress("stats", (m + done / total) / len(teachers), {"teacher": m, "batch": done})
        write_teacher_stats(
            run.fs, STATS, m, names, [(s.n, *s.mean_cov()) for s in acc], fingerprint
        )
        run.manifest.record(_stats_key(m), "stats")
        remove_state(run.fs, ckpt)
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
