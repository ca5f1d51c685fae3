"""The coreset baselines' images (issue 15): IPC real training images per class, selected in
teacher `validation.coreset_teacher`'s penultimate feature space by herding and/or k-center
greedy (d3s_core/coresets.py), from one pass over the training set, class by class; each
selection is written as an image store like the random-real baseline's."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator

import torch

from d3s_core.coresets import herding, k_center_greedy, penultimate_features
from storage.run import Run, baseline_prefix, images_of
from storage.states import has_state, remove_state, resume_state, save_state

from ..terminal import Count
from .common import (
    ClassRows,
    Progress,
    class_rows,
    data_splits,
    index_batches,
    load_teacher,
    no_progress,
)
from .real_images import real_subset_working_set, write_real_set
from .recipe import recipe
from .synthesis import distilled_classes
from .working_set import F32, F64, Phase, Work, phase

log = logging.getLogger("d3s")  # the Prefect task forwards it to the run's log

CHECKPOINT = "baselines/coresets/checkpoint"
CHUNK = 256  # images read and embedded at a time
CHECKPOINT_SECONDS = 60.0
SELECT = {"herding": herding, "k-center": k_center_greedy}
KIND = {"herding": "herding coreset", "k-center": "k-center greedy coreset"}
FEATURES = "penultimate (input of the last Linear), no augmentation"

Picks = dict[str, list[torch.Tensor]]  # method -> per class done, (IPC,) int64 sample indices


def select_coresets(
    run: Run,
    progress: Progress = no_progress,
    *,
    chunk: int = CHUNK,
    checkpoint_classes: int | None = None,
    checkpoint_seconds: float = CHECKPOINT_SECONDS,
) -> list[str]:
    """Write the image store of each method of `validation.coresets` not yet recorded (those
    recorded are verified and kept); returns every method's store URL, in config order.

    One pass over the training set embeds each class's images (in chunks of `chunk`, through
    one DataLoader for the whole pass) with the coreset teacher, and every pending method
    selects IPC of them; the selections so far are checkpointed every `checkpoint_classes`
    classes (default max(1, K // 20)) or `checkpoint_seconds`, whichever comes first, and at
    the end of the pass (removed once every store is written), so a killed pass resumes at
    the next class and ends as an uninterrupted one would.

    Memory at ImageNet-21K shape (K = 10,450, ~1,300 images a class, 224 px, ResNet-18's
    D = 512): one class's features, 1,300 x 512 float32 (2.5 MiB) plus a float64 copy while
    selecting; one chunk of images, 256 x 3 x 224 x 224 float32 (147 MiB); the selections,
    K x IPC int64 per method (4.0 MiB at IPC 50). Never the dataset's feature matrix
    (~11M x 512 float32 would be ~21 GiB)."""
    methods: list[str] = list(run.config.validation.coresets)
    pending: list[str] = []
    for method in methods:
        rel = images_of(baseline_prefix(method))
        if run.manifest.is_recorded(rel):
            run.manifest.verify(rel)
        else:
            pending.append(method)
    if pending:
        every = checkpoint_classes or max(1, recipe(run).num_classes // 20)
        picks, dim = _select(run, pending, progress, chunk, every, checkpoint_seconds)
        for method in pending:
            _write(run, method, picks[method], dim)
        if has_state(run.fs, CHECKPOINT):
            remove_state(run.fs, CHECKPOINT)
    return [run.fs.url(images_of(baseline_prefix(m))) for m in methods]


def _select(
    run: Run, methods: list[str], progress: Progress, chunk: int, every: int, seconds: float
) -> tuple[dict[str, torch.Tensor], int]:
    """({method: (K, IPC) int64 training-sample indices, row c of class c, each in selection
    order}, feature dimension D), resumed from the checkpoint where it fits."""
    cfg, k = run.config, recipe(run).num_classes
    ipc, m = cfg.synthesis.ipc, cfg.validation.coreset_teacher
    train, _, fingerprint = data_splits(run)
    rows = class_rows(run, train)
    _check_counts(rows, k, ipc)
    key = {"methods": methods, "teacher": m, "ipc": ipc, "num_classes": k, "data": fingerprint}
    picks, dim = _resume(run, key)
    start = len(picks[methods[0]])
    progress("coresets", start / k, {"class": Count(start, k)})
    if start < k:
        teacher = load_teacher(run, m)
        # One DataLoader for the pass; it only iterates its batch sampler (not a Sequence).
        chunks = _ClassChunks(rows, range(start, k), chunk)
        loaded = index_batches(run, train, chunks)  # type: ignore[arg-type]
        last_save = time.monotonic()
        try:
            for c in range(start, k):
                idx = rows.of(c)
                f = _class_features(teacher, loaded, len(idx), c)
                dim = int(f.shape[1])
                for method in methods:
                    picks[method].append(idx[SELECT[method](f, ipc)])
                done = c + 1
                if done == k or done % every == 0 or time.monotonic() - last_save >= seconds:
                    _save(run, picks, key, dim)
                    last_save = time.monotonic()
                progress("coresets", done / k, {"class": Count(done, k)})
        finally:
            loaded.close()  # type: ignore[attr-defined]
    return {method: torch.stack(p) for method, p in picks.items()}, dim


def _check_counts(rows: ClassRows, num_classes: int, ipc: int) -> None:
    counts = (rows.starts[1:] - rows.starts[:-1]).tolist()
    for c in range(num_classes):
        n = counts[c] if c < len(counts) else 0
        if n < ipc:
            raise ValueError(f"class {c} has {n} training images, fewer than IPC {ipc}")


def _class_features(
    teacher: torch.nn.Module,
    loaded: Iterator[tuple[torch.Tensor, torch.Tensor]],
    n: int,
    c: int,
) -> torch.Tensor:
    """(n, D) float32 features of class c's n images, the next batches of `loaded`."""
    parts, got = [], 0
    while got < n:
        x, y = next(loaded)
        if not bool((y == c).all()):
            raise ValueError(f"class {c}: the loader returned images of other classes")
        parts.append(penultimate_features(teacher, x))
        got += len(y)
    return torch.cat(parts)


class _ClassChunks:
    """Batch sampler: the sample indices of `classes`, class after class, in chunks of `size`
    that never span two classes (so a resumed pass reads the same batches)."""

    def __init__(self, rows: ClassRows, classes: Iterable[int], size: int):
        self.rows, self.classes, self.size = rows, list(classes), size

    def __len__(self) -> int:
        counts = self.rows.starts[1:] - self.rows.starts[:-1]
        return sum(math.ceil(int(counts[c]) / self.size) for c in self.classes)

    def __iter__(self) -> Iterator[list[int]]:
        for c in self.classes:
            for part in self.rows.of(c).split(self.size):
                yield part.tolist()


def _save(run: Run, picks: Picks, key: dict, dim: int) -> None:
    state = {method: torch.stack(p) for method, p in picks.items()}
    save_state(run.fs, CHECKPOINT, state, {**key, "feature_dim": dim})


def _resume(run: Run, key: dict) -> tuple[Picks, int]:
    """The selections of the classes done, from a checkpoint made with the same teacher, IPC,
    classes and data and covering every pending method (a stale one is ignored, and replaced
    at the next save); empty otherwise. Returns (picks, feature dimension, 0 if none)."""
    fresh: Picks = {method: [] for method in key["methods"]}
    if (resumed := resume_state(run.fs, CHECKPOINT, log.warning)) is None:
        return fresh, 0
    state, meta = resumed
    same = all(meta.get(name) == key[name] for name in ("teacher", "ipc", "num_classes", "data"))
    if not same or not set(key["methods"]) <= set(meta.get("methods", [])):
        return fresh, 0
    picks = {method: list(state[method].unbind(0)) for method in key["methods"]}
    return picks, int(meta["feature_dim"])


def _write(run: Run, method: str, picks: torch.Tensor, dim: int) -> None:
    """The image store of one method: row r is the next selected image of class classes[r]
    (the distilled set's class order), taken in selection order."""
    k, ipc = picks.shape
    classes = distilled_classes(k, ipc)
    taken = [0] * k
    order = []
    for c in classes.tolist():
        order.append(int(picks[c, taken[c]]))
        taken[c] += 1
    attrs = {
        "selection": method,
        "teacher": run.config.validation.coreset_teacher,
        "feature_dim": dim,
        "features": FEATURES,
    }
    rel = images_of(baseline_prefix(method))
    write_real_set(
        run, rel, torch.tensor(order, dtype=torch.int64), classes, KIND[method], "coresets", attrs
    )


def coresets_working_set(w: Work) -> dict[str, Phase]:
    """One pass over the training set through the coreset teacher, class by class, in chunks
    of `CHUNK` images (each method selects IPC of one class's features at a time); then each
    set written as the random-real baseline's is."""
    f, p = w.teacher, w.p
    rows, dim = w.coreset_rows, w.coreset_dim
    sets, k, ipc = len(w.cfg.validation.coresets), p.num_classes, w.cfg.synthesis.ipc
    device = {
        "teacher weights": f.weight_bytes,
        "chunk x (image + forward)": CHUNK * (w.chw * F32 + f.forward_live),
        # float32 (the chunks' features concatenated) + the selection's float64 copy
        f"one class's features ({rows:,} x {dim:,}: float32 + float64)": rows * dim * (F32 + F64),
    }
    host = {
        **w.loader(CHUNK),
        "per-class training rows (int64)": w.n_train * 8,
        "selections (sets x classes x IPC int64, + checkpoint copy)": 2 * sets * k * ipc * 8,
    }
    return {"pass": phase(host, device), "write": real_subset_working_set(w)["subset"]}
