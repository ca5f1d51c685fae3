"""The random-real baseline: IPC real training images per class, drawn at random (seeded),
labelled by the same ensemble with the same augmentation seeds, and validated by the same
students as the distilled set. Every distillation method must beat it (issue 4's report)."""

from __future__ import annotations

import torch

from d3s_core.labelling import derive_seed
from storage.config import Protocol
from storage.run import BASELINE, FULL_DATA, Run, baseline_prefix, images_of

from .common import ClassRows, Progress, class_rows, data_splits, no_progress
from .coreset import select_coresets
from .labels import label_run
from .real_images import write_real_set
from .recipe import recipe
from .synthesis import distilled_classes
from .validation import validate


def draw_real(rows: ClassRows, classes: torch.Tensor, num_classes: int, ipc: int, seed: int):
    """(N,) int64 training-sample index of each row of the baseline set (row r has class
    classes[r]): per class, in class order, the first IPC of a seeded permutation of its
    samples; rows of class c take them in turn."""
    g = torch.Generator().manual_seed(derive_seed(seed, 400))
    chosen: list[list[int]] = []
    for c in range(num_classes):
        pool = rows.of(c)
        if len(pool) < ipc:
            raise ValueError(f"class {c} has {len(pool)} training images, fewer than IPC {ipc}")
        chosen.append(pool[torch.randperm(len(pool), generator=g)[:ipc]].tolist())
    taken = [0] * num_classes
    order = []
    for c in classes.tolist():
        order.append(chosen[c][taken[c]])
        taken[c] += 1
    return torch.tensor(order, dtype=torch.int64)


def random_real_subset(run: Run) -> str:
    """Write the baseline image set (same classes and order as the distilled set), one
    synthesis-batch-sized chunk at a time, read through the run's DataLoader path."""
    rel = images_of(BASELINE)
    if run.manifest.is_recorded(rel):
        run.manifest.verify(rel)
        return run.fs.url(rel)
    cfg, p = run.config, recipe(run)
    train, _, _ = data_splits(run)
    classes = distilled_classes(p.num_classes, cfg.synthesis.ipc)
    order = draw_real(class_rows(run, train), classes, p.num_classes, cfg.synthesis.ipc, cfg.seed)
    return write_real_set(run, rel, order, classes, "random real subset", "baseline")


BASELINE_NAME = "random-real baseline"  # how its progress is labelled (not as the real stages)


def baseline_progress(
    progress: Progress,
    what: str,
    stage: str = "baseline",
    name: str = BASELINE_NAME,
    span: tuple[float, float] = (0.0, 1.0),
) -> Progress:
    """The labels or validation code's progress, reported as a baseline's: stage `stage`, its
    fraction mapped into `span` of the stage's way, named "<name> <what>" ("random-real
    baseline labels, epoch 2/30"), never as the distilled set's labels or validation."""
    lo, hi = span

    def relabel(_stage: str, fraction: float, info: dict) -> None:
        progress(stage, min(1.0, lo + (hi - lo) * fraction), {name: what, **info})

    return relabel


def validate_set(
    run: Run,
    progress: Progress,
    prefix: str,
    stage: str = "baseline",
    name: str = BASELINE_NAME,
    span: tuple[float, float] = (0.0, 1.0),
) -> dict[str, str]:
    """A baseline image set under each of the run's protocols: soft labels it (the ensemble,
    the same augmentation seeds as the distilled set) and trains students on the labels; hard
    trains them on its class labels. Progress in equal parts of `span`. Returns {protocol:
    summary URL}."""
    protocols = run.config.validation.protocols
    stored = "soft" in protocols and run.config.labels.format != "online"
    steps: list[tuple[str, Protocol | None]] = [("labels", None)] if stored else []
    steps += [("students" if p == "soft" else "hard-label students", p) for p in protocols]
    lo, width = span[0], (span[1] - span[0]) / len(steps)
    out: dict[str, str] = {}
    for k, (what, protocol) in enumerate(steps):
        part = (lo + k * width, lo + (k + 1) * width)
        relabelled = baseline_progress(progress, what, stage, name, part)
        if protocol is None:
            label_run(run, relabelled, prefix)
        else:
            out[protocol] = validate(run, relabelled, prefix, protocol)
    return out


def baseline_real(run: Run, progress: Progress = no_progress) -> str:
    """The random-real baseline: its images, then each protocol's students."""
    progress("baseline", 0.0, {BASELINE_NAME: "images"})
    random_real_subset(run)
    return next(iter(validate_set(run, progress, BASELINE).values()))


def baseline_coresets(run: Run, progress: Progress = no_progress) -> list[str]:
    """The coreset baselines (`validation.coresets`): one pass over the training set selects
    every method's images (tasks/stages/coreset.py; the stage's first tenth), then each set's
    students under each protocol."""

    def selecting(stage: str, fraction: float, info: dict) -> None:
        progress("coresets", 0.1 * fraction, {"selection": "teacher features", **info})

    select_coresets(run, selecting)
    methods = run.config.validation.coresets
    urls: list[str] = []
    for i, method in enumerate(methods):
        span = (0.1 + 0.9 * i / len(methods), 0.1 + 0.9 * (i + 1) / len(methods))
        got = validate_set(run, progress, baseline_prefix(method), "coresets", method, span)
        urls += got.values()
    return urls


def full_data_reference(run: Run, progress: Progress = no_progress) -> str:
    """The full-data reference: students trained on every training image under the hard
    protocol (the denominator of hard-label recovery)."""
    relabelled = baseline_progress(progress, "hard-label students", "full-data", "full data")
    return validate(run, relabelled, FULL_DATA, "hard")
