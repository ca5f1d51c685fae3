"""What every stage needs: the preset, the data, the teachers, progress callbacks."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load

from d3s_core.models import build_model, freeze
from d3s_core.presets import Preset
from d3s_core.students import evaluate_top1
from storage.datasets import NormalisedImages, open_splits
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


def batches(
    run: Run,
    ds: Dataset,
    batch_size: int,
    generator: torch.Generator | None = None,
    start_batch: int = 0,
    stop_batch: int | None = None,
):
    """(x, y) batches on the run's device: straight slices of in-memory sets, a multi-worker
    DataLoader otherwise. `generator` shuffles (seeded, so an epoch can be replayed); without
    it the order is the dataset's, and batches [start_batch, stop_batch) are read, the others
    skipped without reading them."""
    device = run.config.device
    if isinstance(ds, NormalisedImages):
        x, y = ds.tensors()
        order = (
            torch.randperm(len(x), generator=generator)
            if generator is not None
            else torch.arange(len(x))
        )
        for idx in order.split(batch_size)[start_batch:stop_batch]:
            yield x[idx].to(device), y[idx].to(device)
        return
    order = None
    if start_batch or stop_batch is not None:
        assert generator is None, "skipping batches needs the sequential order"
        stop = len(ds) if stop_batch is None else min(len(ds), stop_batch * batch_size)  # type: ignore[arg-type]
        order = range(start_batch * batch_size, stop)
    if isinstance(ds, TarShardDataset):
        # Shuffled epochs stay within a few shards at a time (TarShardDataset.shuffled_order);
        # sequential ranges are indexed here, once, before the workers fork.
        if generator is not None:
            order, generator = ds.shuffled_order(generator), None
        else:
            order = range(len(ds)) if order is None else order
            ds.index_range(order.start, order.stop)
    elif order is not None:
        ds, order = torch.utils.data.Subset(ds, order), None
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=generator is not None,
        generator=generator,
        sampler=order,
        num_workers=run.config.stats.workers,
        pin_memory=device.startswith("cuda"),
    )
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


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
