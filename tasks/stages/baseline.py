"""The random-real baseline: IPC real training images per class, drawn at random (seeded),
labelled by the same ensemble with the same augmentation seeds, and validated by the same
students as the distilled set. Every distillation method must beat it (issue 4's report)."""

from __future__ import annotations

import numpy as np
import torch
import zarr

from d3s_core.labelling import derive_seed
from storage.arrays import create_images, write_image_batch
from storage.fs import RunFS
from storage.run import BASELINE, FULL_DATA, Run, baseline_prefix, images_of

from .common import ClassRows, Progress, class_rows, data_splits, index_batches, no_progress
from .labels import label_run
from .recipe import recipe
from .synthesis import distilled_classes
from .validation import validate

TRAIN_INDICES = "train_indices"


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


def write_real_set(
    run: Run,
    rel: str,
    order: torch.Tensor,
    classes: torch.Tensor,
    kind: str,
    stage: str,
    attrs: dict | None = None,
) -> str:
    """Write an image store of real training images: row r is training sample order[r], of
    class classes[r] (the distilled set's class order), with its `train_indices`; read one
    synthesis-batch-sized chunk at a time through the run's DataLoader path (memory: one
    chunk), then recorded in the manifest under `stage`. `attrs`: more store attributes."""
    cfg, p = run.config, recipe(run)
    train, _, _ = data_splits(run)
    bsz = cfg.synthesis.batch_size
    shape = (p.in_chans, p.image_size, p.image_size)
    attrs = {
        "mean": list(p.mean),
        "std": list(p.std),
        "space": "normalised",
        "kind": kind,
        **(attrs or {}),
    }
    create_images(run.fs, rel, len(classes), shape, bsz, classes, attrs)
    _write_train_indices(run.fs, rel, order)
    chunks = [chunk.tolist() for chunk in order.split(bsz)]
    for k, (x, y) in enumerate(index_batches(run, train, chunks)):
        want = classes[k * bsz : k * bsz + len(y)].to(y.device)
        if not torch.equal(y, want):
            raise ValueError(f"{run.fs.url(rel)}: rows {k * bsz}.. are not of their classes")
        write_image_batch(run.fs, rel, k * bsz, x)
    run.manifest.record(rel, stage)
    return run.fs.url(rel)


def _group(fs: RunFS, rel: str, mode: str) -> zarr.Group:
    opts = None if fs.local else fs.storage_options or None
    return zarr.open_group(fs.url(rel), mode=mode, storage_options=opts)  # type: ignore[arg-type]


def _write_train_indices(fs: RunFS, rel: str, order: torch.Tensor) -> None:
    """`train_indices` (N,) int64: the training sample of each row."""
    g = _group(fs, rel, "a")
    g.create_array(TRAIN_INDICES, shape=order.shape, dtype="int64", overwrite=True)[:] = (
        order.numpy()
    )


def train_indices(fs: RunFS, rel: str) -> torch.Tensor:
    """(N,) int64 training sample of each row of a baseline image store (the `train_indices`
    array; stores written before it have the list in their attributes)."""
    g = _group(fs, rel, "r")
    if TRAIN_INDICES in g:
        return torch.from_numpy(np.asarray(g[TRAIN_INDICES][:]))  # type: ignore[index]
    return torch.tensor(g.attrs[TRAIN_INDICES], dtype=torch.int64)  # type: ignore[arg-type]


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
    steps = [("labels", None)] if "soft" in protocols else []
    steps += [("students" if p == "soft" else "hard-label students", p) for p in protocols]
    lo, width = span[0], (span[1] - span[0]) / len(steps)
    out = {}
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
    from .coreset import select_coresets

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
