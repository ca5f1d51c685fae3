"""What every stage needs: the preset, the data, the teachers, progress callbacks."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load

from d3s_core.models import build_model, freeze
from d3s_core.presets import Preset
from d3s_core.students import evaluate_top1
from storage.datasets import NormalisedImages, PixelItems, normalise, open_splits
from storage.imagefolder import ImageFolderDataset
from storage.run import Run, teacher_meta, teacher_weights
from storage.states import weights_blob
from storage.webdataset import TarShardDataset

Progress = Callable[[str, float, dict[str, Any]], None]


def no_progress(stage: str, fraction: float, info: dict[str, Any]) -> None:
    """Progress callback signature: stage name, fraction done in [0, 1], details."""


def new_model(p: Preset, arch: str | None = None) -> torch.nn.Module:
    return build_model(
        arch or p.arch, p.num_classes, in_chans=p.in_chans, low_res=p.low_res, width=p.width
    )


Dataset = torch.utils.data.Dataset


def tar_splits(run: Run) -> tuple[Dataset, Dataset, str]:
    """(train, held-out, fingerprint) of a tar-sharded dataset. Every class index is checked
    against the preset's class count when its shard is indexed. Credentials: the run root's
    storage options where the shards live on the same kind of store, else the environment's."""
    p, ds = run.config.preset_obj(), run.config.dataset
    if not ds.val_path:
        raise ValueError(
            "dataset.val_path is required for a 'webdataset' dataset "
            "(the held-out shards used for teacher and student accuracy)"
        )

    def shards(spec: str) -> TarShardDataset:
        same_store = (fsspec.core.split_protocol(spec)[0] or "file") == run.fs.protocol
        options = run.fs.storage_options if same_store else None
        return TarShardDataset(
            spec, p.image_size, p.in_chans, p.mean, p.std, p.num_classes, options
        )

    assert ds.path is not None
    train = shards(ds.path)
    return train, shards(ds.val_path), train.fingerprint()


def data_splits(run: Run) -> tuple[Dataset, Dataset, str]:
    """(train, held-out, dataset fingerprint) of the run's dataset. ImageFolder trees and tar
    shards are streamed from disk; the small kinds (mnist5k, synthetic) live in memory."""
    cfg, p = run.config, run.config.preset_obj()
    ds = cfg.dataset
    if ds.kind == "webdataset":
        return tar_splits(run)
    if ds.kind == "imagefolder":
        assert ds.path is not None
        train = ImageFolderDataset(ds.path, p.image_size, p.in_chans, p.mean, p.std)
        if len(train.classes) != p.num_classes:
            raise ValueError(
                f"{ds.path}: {len(train.classes)} class folders, but preset "
                f"{p.name!r} has {p.num_classes} classes"
            )
        if ds.val_path:
            held: Dataset = ImageFolderDataset(
                ds.val_path, p.image_size, p.in_chans, p.mean, p.std, expect_classes=train.classes
            )
        else:
            raise ValueError(
                "dataset.val_path is required for an imagefolder dataset "
                "(the held-out tree used for teacher and student accuracy)"
            )
        return train, held, train.fingerprint()
    return open_splits(
        ds.kind,
        p.num_classes,
        p.in_chans,
        p.image_size,
        p.mean,
        p.std,
        seed=cfg.seed,
        test_fraction=ds.test_fraction,
        synthetic_size=ds.synthetic_size,
    )


def save_teacher(run: Run, m: int, model: torch.nn.Module, meta: dict[str, Any]) -> None:
    """Weights (safetensors), then metadata; both recorded in the manifest."""
    run.fs.write_bytes(teacher_weights(m), weights_blob(model.state_dict()))
    run.fs.write_bytes(teacher_meta(m), json.dumps(meta, indent=1).encode())
    run.manifest.record(teacher_weights(m), "teachers")
    run.manifest.record(teacher_meta(m), "teachers")


def load_teachers(run: Run) -> list[torch.nn.Module]:
    """The run's M teachers, verified against the manifest, frozen, on the run's device."""
    return [load_teacher(run, m) for m in range(run.config.teachers.count)]


def load_teacher(run: Run, m: int) -> torch.nn.Module:
    """Teacher m, verified against the manifest, frozen, on the run's device."""
    p = run.config.preset_obj()
    run.manifest.verify(teacher_weights(m))
    run.manifest.verify(teacher_meta(m))
    meta = json.loads(run.fs.read_bytes(teacher_meta(m)))
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
        return torch.tensor([c for _, c in ds.samples])
    if isinstance(ds, TarShardDataset):
        return ds.sample_classes()
    raise TypeError(f"unknown dataset type {type(ds).__name__}")


def held_out_top1(run: Run, model: torch.nn.Module, ds: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy in [0, 1] on a held-out dataset, streamed."""
    correct, total = 0.0, 0
    for x, y in batches(run, ds, batch_size):
        correct += evaluate_top1(model, x, y) * len(y)
        total += len(y)
    return correct / max(1, total)
