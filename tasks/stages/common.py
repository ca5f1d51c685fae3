"""What every stage needs: the recipe, the data, the teachers, progress callbacks."""

from __future__ import annotations

import ctypes
import functools
import math
import os
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
import torch
from safetensors.torch import load as st_load

from d3s_core.models import build_model, freeze
from d3s_core.presets import Preset
from d3s_core.students import evaluate_top1
from storage.dataset_index import (
    INDEX,
    DatasetIndex,
    FolderListing,
    commit_index,
    read_index,
    source_of,
    write_folder_split,
)
from storage.datasets import NormalisedImages, PixelItems, normalise, open_splits
from storage.imagefolder import ImageFolderDataset
from storage.records import read_teacher_meta, write_teacher_meta
from storage.run import Run, teacher_meta, teacher_weights
from storage.states import weights_blob
from storage.webdataset import TarShardDataset

from .recipe import data_profile, recipe

Progress = Callable[[str, float, dict[str, Any]], None]


_T = TypeVar("_T")


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: its allocator has its own policy
        return None


def trim_heap() -> bool:
    """Give the heap's free pages back to the kernel now (glibc's `malloc_trim(0)`; True if
    it released any). The allocator's policy is not touched: nothing else in the process pays."""
    libc = _libc()
    return bool(libc is not None and getattr(libc, "malloc_trim", None) and libc.malloc_trim(0))


def resident_mib() -> float:
    """This process's resident memory now (Linux /proc/self/statm; 0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * (os.sysconf("SC_PAGE_SIZE") / 2**20)


TRIM_SLACK_MIB = 32.0


def trimmed(items: Iterable[_T], slack_mib: float = TRIM_SLACK_MIB) -> Iterator[_T]:
    """`items`, with the heap trimmed whenever the process's resident memory after an item has
    grown by more than `slack_mib` above its level after the first item (or the first item
    after the last trim): checked after each item, one read of /proc.

    For a loop whose per-item buffers are large (the labels stage: an 8 MiB batch of
    10,450-class logits, its crops and the teachers' activations; the statistics pass). glibc
    raises its mmap threshold to the size of each large block freed (up to 32 MiB), after
    which such buffers come from the heap, which then keeps the high-water mark of the loop's
    churn: measured on the labels stage at ImageNet-21K shape, 1.7 GiB above the stage's start.
    Trimming returns that churn once it exceeds the slack, so the loop's resident memory stays
    within its working set plus `slack_mib` (tests/test_scale.py), while the allocator's policy
    is left alone: in steady state a trim is rare and costs only the pages it returns. Fixing
    the threshold process-wide instead (mallopt M_MMAP_THRESHOLD) made every stage's large
    tensors fresh zero-filled mmaps: 1.4-1.7x slower CPU training steps
    (bench/bench_allocator.py)."""
    floor: float | None = None
    for item in items:
        yield item
        rss = resident_mib()
        if floor is None:  # the level after an item, its working set included
            floor = rss
        elif rss - floor > slack_mib:
            trim_heap()
            # The next item regrows its working set: its level is the new floor. (The level
            # right after a trim would be lower by the working set, and every later item would
            # trim again: 1.19x slower student epochs, measured.)
            floor = None


def no_progress(stage: str, fraction: float, info: dict[str, Any]) -> None:
    """Progress callback signature: stage name, fraction done in [0, 1], details."""


def new_model(p: Preset, arch: str | None = None) -> torch.nn.Module:
    return build_model(
        arch or p.arch, p.num_classes, in_chans=p.in_chans, low_res=p.low_res, width=p.width
    )


Dataset = torch.utils.data.Dataset


def _writes_index(run: Run, index: DatasetIndex | None, write: bool) -> bool:
    """Whether this process writes the dataset index: the data stage (`write`) holding the
    run's lock, where there is none yet. Any other stage holding the lock finds it there;
    workers (`attach_run`) list the data in memory where there is none."""
    if index is not None:
        return False
    if run.lock is not None and not write:
        raise ValueError(
            f"{run.fs.url(INDEX)}: no dataset index yet; the data stage writes "
            f"it first (`d3s run`, or `d3s data CONFIG --root {run.fs.url()}`)"
        )
    return run.lock is not None


@dataclass(frozen=True)
class Decode:
    """How a stage reads the run's image files: the data's shape (the run's data profile,
    tasks/stages/profile.py) and the conversion rules. num_classes None: not checked (while
    the class count is being found)."""

    image_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_ratio: float
    to_grey: bool
    num_classes: int | None

    @classmethod
    def of(cls, run: Run) -> Decode:
        r = recipe(run)
        return cls(
            r.image_size,
            r.in_chans,
            r.mean,
            r.std,
            crop_ratio(run),
            run.config.dataset.channels == 1,
            r.num_classes,
        )


def crop_ratio(run: Run) -> float:
    return float(data_profile(run)["values"]["crop_ratio"])


def tar_splits(run: Run, dec: Decode, write_index: bool = False) -> tuple[Dataset, Dataset, str]:
    """(train, held-out, fingerprint) of a tar-sharded dataset. Every class index is checked
    against the data's class count when its shard is indexed. Credentials: the run root's
    storage options where the shards live on the same kind of store, else the environment's.
    Shard sample counts and the fingerprint come from the run's dataset index."""
    ds = run.config.dataset
    if not ds.val_path:
        raise ValueError(
            "dataset.val_path is required for a 'webdataset' dataset "
            "(the held-out shards used for teacher and student accuracy)"
        )
    assert ds.path is not None
    sources = {"train": ds.path, "val": ds.val_path}
    index = read_index(run.fs, "webdataset", sources)

    def shards(split: str) -> TarShardDataset:
        spec = sources[split]
        same_store = (fsspec.core.split_protocol(spec)[0] or "file") == run.fs.protocol
        options = run.fs.storage_options if same_store else None
        return TarShardDataset(
            spec,
            dec.image_size,
            dec.in_chans,
            dec.mean,
            dec.std,
            dec.num_classes,
            options,
            listing=None if index is None else index.splits[split],
            crop_ratio=dec.crop_ratio,
            to_grey=dec.to_grey,
        )

    train, held = shards("train"), shards("val")
    if _writes_index(run, index, write_index):
        splits = {
            split: {"source": source_of(sources[split]), **d.listing()}
            for split, d in (("train", train), ("val", held))
        }
        assert run.lock is not None
        run.lock.check()
        commit_index(run.fs, "webdataset", splits)
    return train, held, train.fingerprint()


def folder_splits(run: Run, dec: Decode, write_index: bool = False) -> tuple[Dataset, Dataset, str]:
    """(train, held-out, fingerprint) of ImageFolder trees, listed from the run's dataset
    index; the process holding the run's lock writes the index where there is none yet."""
    ds = run.config.dataset
    assert ds.path is not None
    if not ds.val_path:
        raise ValueError(
            "dataset.val_path is required for an imagefolder dataset "
            "(the held-out tree used for teacher and student accuracy)"
        )
    sources = {"train": ds.path, "val": ds.val_path}
    index = read_index(run.fs, "imagefolder", sources)
    writes = _writes_index(run, index, write_index)
    entries: dict[str, dict[str, Any]] = {}

    def listing(split: str) -> FolderListing:
        if index is not None:
            return index.folder_listing(run.fs, split)
        if writes:
            entries[split], out = write_folder_split(run.fs, split, sources[split])
            return out
        return FolderListing.scan(sources[split])

    train = ImageFolderDataset(
        ds.path,
        dec.image_size,
        dec.in_chans,
        dec.mean,
        dec.std,
        listing=listing("train"),
        crop_ratio=dec.crop_ratio,
        to_grey=dec.to_grey,
    )
    if dec.num_classes is not None and len(train.classes) != dec.num_classes:
        raise ValueError(
            f"{ds.path}: {len(train.classes)} class folders, but dataset.num_classes is "
            f"{dec.num_classes}; unset it to take the class count from the folders"
        )
    held = ImageFolderDataset(
        ds.val_path,
        dec.image_size,
        dec.in_chans,
        dec.mean,
        dec.std,
        expect_classes=train.classes,
        listing=listing("val"),
        crop_ratio=dec.crop_ratio,
        to_grey=dec.to_grey,
    )
    if writes:  # index.json last: it commits the column files (checked above)
        assert run.lock is not None
        run.lock.check()
        commit_index(run.fs, "imagefolder", entries)
    return train, held, train.fingerprint()


def data_splits(
    run: Run, dec: Decode | None = None, write_index: bool = False
) -> tuple[Dataset, Dataset, str]:
    """(train, held-out, dataset fingerprint) of the run's dataset, read with `dec` (default:
    the run's data profile, measured on first use). ImageFolder trees and tar shards are
    streamed from disk, their listing read from the run's dataset index (`dataset/`, written
    once by the first stage); the small kinds (mnist5k, synthetic) live in memory."""
    cfg = run.config
    ds = cfg.dataset
    dec = dec or Decode.of(run)
    if ds.kind == "webdataset":
        return tar_splits(run, dec, write_index)
    if ds.kind == "imagefolder":
        return folder_splits(run, dec, write_index)
    p = cfg.preset_obj()
    return open_splits(
        ds.kind,
        dec.num_classes or ds.num_classes or p.num_classes,
        dec.in_chans,
        dec.image_size,
        dec.mean,
        dec.std,
        seed=cfg.seed,
        test_fraction=ds.test_fraction,
        synthetic_size=ds.synthetic_size,
    )


def save_teacher(run: Run, m: int, model: torch.nn.Module, meta: dict[str, Any]) -> None:
    """Weights (safetensors), then metadata; both recorded in the manifest."""
    run.fs.write_bytes(teacher_weights(m), weights_blob(model.state_dict()))
    write_teacher_meta(run.fs, m, meta)
    run.manifest.record(teacher_weights(m), "teachers")
    run.manifest.record(teacher_meta(m), "teachers")


def load_teachers(run: Run) -> list[torch.nn.Module]:
    """The run's M teachers, verified against the manifest, frozen, on the run's device."""
    return [load_teacher(run, m) for m in range(run.config.teachers.count)]


def load_teacher(run: Run, m: int) -> torch.nn.Module:
    """Teacher m, verified against the manifest, frozen, on the run's device."""
    p = recipe(run)
    run.manifest.verify(teacher_weights(m))
    run.manifest.verify(teacher_meta(m))
    meta = read_teacher_meta(run.fs, m)
    if meta["num_classes"] != p.num_classes:
        raise ValueError(
            f"{run.fs.url(teacher_meta(m))}: teacher has {meta['num_classes']} "
            f"classes, the dataset {p.num_classes}"
        )
    model = new_model(p, meta["arch"])
    model.load_state_dict(st_load(run.fs.read_bytes(teacher_weights(m))))
    return freeze(model.to(run.config.device))


class _SequentialBatches:
    """Batch sampler: the sample indices of batches `ids` of the sequential order, made as they
    are needed (a list of every index of a large dataset would take gigabytes)."""

    def __init__(self, n: int, batch_size: int, ids: list[int]):
        self.n, self.batch_size, self.ids = n, batch_size, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[list[int]]:
        bs = self.batch_size
        for b in self.ids:
            yield list(range(b * bs, min(self.n, (b + 1) * bs)))


def _load(run: Run, ds: Dataset, **kw: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One DataLoader (one set of `stats.workers` worker processes, started once) over `ds`.
    Image-file datasets travel as uint8 pixels (pinned on CUDA, copied without blocking) and
    are normalised on the run's device; other datasets as their float samples."""
    device = run.config.device
    raw = PixelItems(ds) if isinstance(ds, ImageFolderDataset | TarShardDataset) else None
    loader = torch.utils.data.DataLoader(
        raw if raw is not None else ds,
        num_workers=run.config.stats.workers,
        pin_memory=device.startswith("cuda"),
        **kw,
    )
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        if raw is not None:
            x = normalise(x, raw.mean, raw.std)
        yield x, y.to(device, non_blocking=True)


def _in_memory(ds: NormalisedImages, idx, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `idx` of an in-memory set: uint8 to the device, normalised there."""
    x, y = ds.images[idx].to(device), ds.classes[idx].to(device, copy=True)
    return normalise(x, ds.mean, ds.std), y


def sequential_batches(
    run: Run, ds: Dataset, batch_size: int, ids: Iterable[int]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches number `ids` (ascending, each < ceil(len(ds) / batch_size)) of the dataset's
    sequential order, as (x, y) on the run's device: all of them through one DataLoader, so
    its workers start once however the batches are grouped; batches not listed are not read."""
    ids = list(ids)
    if not ids:
        return
    n = len(ds)  # type: ignore[arg-type]
    if isinstance(ds, NormalisedImages):
        for b in ids:
            yield _in_memory(
                ds, slice(b * batch_size, min(n, (b + 1) * batch_size)), run.config.device
            )
        return
    if isinstance(ds, TarShardDataset):
        # Indexed here, once, before the workers fork (the first shards of the range).
        ds.index_range(ids[0] * batch_size, min(n, (ids[-1] + 1) * batch_size))
    yield from _load(run, ds, batch_sampler=_SequentialBatches(n, batch_size, ids))


def index_batches(
    run: Run, ds: Dataset, index_lists: Sequence[Sequence[int]]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) on the run's device of the samples in each of `index_lists` (any indices, any
    order), through one DataLoader: only those samples are read, a batch at a time."""
    yield from _load(run, ds, batch_sampler=index_lists)


def batches(
    run: Run,
    ds: Dataset,
    batch_size: int,
    generator: torch.Generator | None = None,
    start_batch: int = 0,
    stop_batch: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches on the run's device: straight slices of in-memory sets, a multi-worker
    DataLoader otherwise; images travel as uint8 and are normalised on the device.
    `generator` shuffles (seeded, so an epoch can be replayed); without it the order is the
    dataset's, and batches [start_batch, stop_batch) are read, the others skipped without
    reading them."""
    if generator is None:
        n_batches = math.ceil(len(ds) / batch_size)  # type: ignore[arg-type]
        stop = n_batches if stop_batch is None else min(stop_batch, n_batches)
        yield from sequential_batches(run, ds, batch_size, range(start_batch, stop))
        return
    assert not start_batch and stop_batch is None, "skipping batches needs the sequential order"
    if isinstance(ds, NormalisedImages):
        for idx in torch.randperm(len(ds), generator=generator).split(batch_size):
            yield _in_memory(ds, idx, run.config.device)
    elif isinstance(ds, TarShardDataset):
        # Shuffled epochs stay within a few shards at a time (TarShardDataset.shuffled_order).
        yield from _load(run, ds, batch_size=batch_size, sampler=ds.shuffled_order(generator))
    else:
        yield from _load(run, ds, batch_size=batch_size, shuffle=True, generator=generator)


def class_of_each(ds: Dataset) -> torch.Tensor:
    """(N,) class of every sample, without reading images."""
    if isinstance(ds, NormalisedImages):
        return ds.classes
    if isinstance(ds, ImageFolderDataset):
        counts = torch.from_numpy(ds.listing.counts)
        return torch.repeat_interleave(torch.arange(len(counts)), counts)
    if isinstance(ds, TarShardDataset):
        return ds.sample_classes()
    raise TypeError(f"unknown dataset type {type(ds).__name__}")


@dataclass(frozen=True)
class ClassRows:
    """The sample indices of each class: those of class c are `order[starts[c]:starts[c + 1]]`,
    ascending; `order` None means the samples are grouped by class already (ImageFolder:
    class c is rows starts[c]..starts[c + 1] - 1)."""

    starts: torch.Tensor  # (K + 1,) int64
    order: torch.Tensor | None  # (N,) int64

    def of(self, c: int) -> torch.Tensor:
        """(count of c,) int64 indices of class c's samples, ascending (empty for a class with
        none): `torch.nonzero(class_of_each(ds) == c).flatten()` in O(count of c)."""
        if not 0 <= c < len(self.starts) - 1:
            return torch.empty(0, dtype=torch.int64)
        lo, hi = int(self.starts[c]), int(self.starts[c + 1])
        return torch.arange(lo, hi) if self.order is None else self.order[lo:hi].clone()


_CLASS_ROWS: weakref.WeakKeyDictionary[Any, ClassRows] = weakref.WeakKeyDictionary()


def class_rows(run: Run, ds: Dataset) -> ClassRows:
    """The training-sample indices of each of the preset's classes, made once per dataset
    object: ImageFolder from the index's per-class first rows (no pass over the samples); the
    other kinds from their classes, a stable sort (tar shards: one header pass per shard not
    yet indexed, as `class_of_each`)."""
    if ds in _CLASS_ROWS:
        return _CLASS_ROWS[ds]
    if isinstance(ds, ImageFolderDataset):
        rows = ClassRows(torch.from_numpy(ds.listing.starts), None)
    else:
        k = recipe(run).num_classes
        y = class_of_each(ds)
        counts = torch.bincount(y, minlength=k)[:k]
        starts = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        rows = ClassRows(starts, torch.sort(y, stable=True).indices)
    _CLASS_ROWS[ds] = rows
    return rows


def held_out_top1(run: Run, model: torch.nn.Module, ds: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy in [0, 1] on a held-out dataset, streamed."""
    correct, total = 0.0, 0
    for x, y in batches(run, ds, batch_size):
        correct += evaluate_top1(model, x, y) * len(y)
        total += len(y)
    return correct / max(1, total)
