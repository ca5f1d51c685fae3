"""The run's data profile and recipe: what a run takes from its data (class count, channels,
image size and resize rule, normalisation), what from its config and what from its preset, and
the recipe (Preset) that every stage uses, fitted to the data.

The profile is found once, by the first stage that opens the data while holding the run's lock
(`dataset/profile.json`, storage/profile.py), from the training split:
- classes: ImageFolder's class folders; tar shards' `.cls` values (0..max); mnist5k's 10;
  the synthetic test data's declared or preset count;
- channels and image size from the headers of the inspected images (all of them up to
  `dataset.profile_samples`, else a seeded uniform sample), unless declared;
- mean/std measured over the pixels of the same images, exactly (d3s_core.dataprofile), unless
  declared or taken from the preset (`dataset.normalisation: preset`; the default for the
  preset's own data).
Memory at ImageNet-21K shape: one DataLoader batch of pixels and the inspected images' short
sides (100,000 ints by default); the class count of tar shards needs one header pass over
every training shard (the same pass `len()` makes without sizes.json).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from d3s_core.dataprofile import (
    CROP_RATIO_IMAGENET,
    HeaderSummary,
    PixelMoments,
    infer_channels,
    infer_size,
    profile_rows,
)
from d3s_core.presets import Preset
from storage.dataset_index import INDEX, remove_index
from storage.datasets import NormalisedImages, PixelItems
from storage.imagefolder import ImageFolderDataset
from storage.manifest import CorruptArtifact
from storage.profile import PROFILE, read_profile, write_profile
from storage.run import Run
from storage.webdataset import TarShardDataset

from .common import Decode, Progress, data_splits, no_progress
from .recipe import provenance_lines

log = logging.getLogger("d3s")  # the Prefect task forwards it to the run's log

HEADER_CHUNK = 1024


def open_data(run: Run, progress: Progress = no_progress) -> str:
    """The `data` stage, first in every run: profile the data (`dataset/profile.json`) and,
    for ImageFolder trees and tar shards, write its index (`dataset/`), where they are not
    there yet; then log what the run takes from the data, the config and the preset, and the
    recipe's warnings. Returns the profile's URL."""
    finished = bool(run.manifest.entries())  # a file lost after that is worth a warning
    try:
        profile = read_profile(run.fs)
    except CorruptArtifact as e:  # derived from the data and the config: measured again
        log.warning("%s: measured again from the data", e)
        profile = None
    if profile is None and finished:
        log.warning("%s: missing; measured again from the data", run.fs.url(PROFILE))
    if profile is None:
        profile = measure_profile(run)  # it writes the index as it lists the data
        if run.lock is not None:
            run.lock.check()
            profile = write_profile(run.fs, profile)
    run.__dict__["_profile"] = profile
    files = run.config.dataset.kind in ("imagefolder", "webdataset")
    if files and not run.fs.exists(INDEX) and finished:
        log.warning("%s: missing; the data is indexed again", run.fs.url(INDEX))
    try:
        data_splits(run, write_index=True)  # where the profile was there but the index was not
    except CorruptArtifact as e:  # a listing of the data: made again (the same data gives the
        # same fingerprint, which the statistics and every later stage check)
        log.warning("%s: the data is indexed again", e)
        remove_index(run.fs)
        data_splits(run, write_index=True)
    for line in provenance_lines(run):
        log.info("data: %s", line)
    for w in profile.get("warnings", []):
        log.warning("recipe: %s", w)
    progress("data", 1.0, {})
    return run.fs.url(PROFILE)


def _preset_norm(p: Preset, channels: int, why: str) -> tuple[list[float], list[float], str]:
    if len(p.mean) != channels:
        raise ValueError(
            f"dataset.normalisation: preset {p.name!r}'s mean/std are for {len(p.mean)} "
            f"channels, the data has {channels}; declare dataset.mean and dataset.std or set "
            "dataset.normalisation: measure"
        )
    return list(p.mean), list(p.std), f"preset {p.name!r}: {why}"


def measure_profile(run: Run) -> dict[str, Any]:
    """Find the data profile (see the module docstring)."""
    cfg, p, d = run.config, run.config.preset_obj(), run.config.dataset
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    files = d.kind in ("imagefolder", "webdataset")
    # Read the files with provisional rules first: classes and headers do not depend on them.
    chans0 = d.channels or (p.in_chans if d.kind == "synthetic" else 3)
    if d.kind == "mnist5k":
        chans0 = 1
    size0 = d.image_size or p.image_size
    if d.kind == "mnist5k":
        size0 = 28
    known_k = d.num_classes or (p.num_classes if d.kind == "synthetic" else None)
    provisional = Decode(
        size0,
        chans0,
        (0.0,) * chans0,
        (1.0,) * chans0,
        d.crop_ratio or CROP_RATIO_IMAGENET,
        d.channels == 1,
        known_k if d.kind != "mnist5k" else 10,
    )
    train, _, fingerprint = data_splits(run, provisional, write_index=True)
    n = len(train)  # type: ignore[arg-type]

    # -- classes --
    if isinstance(train, ImageFolderDataset):
        k = len(train.classes)
        sources["num_classes"] = f"data: {k} class folders under {d.path}"
    elif isinstance(train, TarShardDataset):
        if d.num_classes is not None:
            k, sources["num_classes"] = d.num_classes, "config: dataset.num_classes"
        else:
            k = int(train.sample_classes().max()) + 1
            sources["num_classes"] = (
                f"data: classes 0..{k - 1} in the {len(train.paths)} training shards "
                "(set dataset.num_classes if the last classes have no training sample)"
            )
    else:
        assert isinstance(train, NormalisedImages)
        if d.kind == "synthetic":
            k = known_k or p.num_classes
            sources["num_classes"] = (
                "config: dataset.num_classes" if d.num_classes else f"preset {p.name!r}"
            )
        else:
            k = int(train.classes.max()) + 1
            sources["num_classes"] = f"data: classes 0..{k - 1} of the {d.kind} digits"
    values["num_classes"] = k
    if cfg.labels.format == "topk" and cfg.labels.topk > k:
        raise ValueError(
            f"labels.topk: {cfg.labels.topk} must be <= the {k} classes of the data "
            f"({sources['num_classes']})"
        )

    rows = profile_rows(n, d.profile_samples, cfg.seed)
    sample_note = (
        f"all {n} training images" if len(rows) == n else f"{len(rows)} of {n} training images"
    )

    # -- channels and size --
    chans: int
    headers = HeaderSummary()
    if files:
        for lo in range(0, len(rows), HEADER_CHUNK):
            assert not isinstance(train, NormalisedImages)  # files: a tree or tar shards
            headers.add(train.headers(rows[lo : lo + HEADER_CHUNK].tolist()))
        if d.channels is not None:
            chans, sources["channels"] = d.channels, "config: dataset.channels"
        else:
            chans, why = infer_channels(headers)
            sources["channels"] = f"data: {why}"
        if d.image_size is not None:
            size = d.image_size
            sources["image_size"] = "config: dataset.image_size"
            same = set(headers.short_sides) == {size}
            ratio = 1.0 if same else CROP_RATIO_IMAGENET
            ratio_why = (
                f"every inspected image is {size} px on its short side"
                if same
                else "the images' short sides differ from it: ImageNet's 8/7 rule"
            )
        else:
            size, ratio, why = infer_size(headers, p.image_size, f"preset {p.name!r}")
            sources["image_size"] = f"data: {why}" if ratio == 1.0 else f"preset {p.name!r}: {why}"
            ratio_why = "no resampling" if ratio == 1.0 else "ImageNet's 8/7 rule"
        if d.crop_ratio is not None:
            ratio, sources["crop_ratio"] = d.crop_ratio, "config: dataset.crop_ratio"
        else:
            sources["crop_ratio"] = f"rule: {ratio_why}"
    else:
        assert isinstance(train, NormalisedImages)
        chans, size = int(train.images.shape[1]), int(train.images.shape[-1])
        what = "generated for" if d.kind == "synthetic" else "data:"
        how = f"{what} {tuple(train.images.shape[1:])} uint8 images"
        if d.kind == "synthetic":
            how = f"preset {p.name!r}: synthetic images generated at its shape"
        sources["channels"] = sources["image_size"] = how
        ratio, sources["crop_ratio"] = 1.0, "rule: in-memory images are not resized"
    values |= {"channels": chans, "image_size": size, "crop_ratio": ratio}

    # -- normalisation --
    own_data = d.kind == "synthetic" or p.dataset == d.kind
    if d.mean is not None and d.std is not None:
        mean, std = list(d.mean), list(d.std)
        if len(mean) != chans:
            raise ValueError(
                f"dataset.mean: {len(mean)} values, but the data has {chans} channels "
                f"({sources['channels']})"
            )
        how = "config: dataset.mean, dataset.std"
    elif d.normalisation == "preset" or (d.normalisation is None and own_data):
        why = "dataset.normalisation: preset" if d.normalisation else "the preset's own data"
        mean, std, how = _preset_norm(p, chans, why)
    else:
        exact = Decode(size, chans, (0.0,) * chans, (1.0,) * chans, ratio, d.channels == 1, k)
        m = _measure(run, exact, rows)
        mean, std = (list(x) for x in m.mean_std())
        how = f"data: measured over the pixels of {sample_note}"
    values |= {"mean": mean, "std": std}
    sources["mean"] = sources["std"] = how

    profile: dict[str, Any] = {
        "dataset": {"kind": d.kind, "path": d.path, "val_path": d.val_path},
        "fingerprint": fingerprint,
        "train_images": n,
        "inspected": {"images": len(rows), "of": n, **(headers.as_json() if files else {})},
        "values": values,
        "sources": sources,
    }
    profile["warnings"] = data_warnings(run, profile, headers if files else None)
    return profile


def _measure(run: Run, dec: Decode, rows) -> PixelMoments:
    """Exact pixel moments of the training images `rows`, read as the stages read them."""
    train, _, _ = data_splits(run, dec)
    m = PixelMoments(dec.in_chans)
    chunks = [rows[lo : lo + 256].tolist() for lo in range(0, len(rows), 256)]
    if isinstance(train, NormalisedImages):
        for idx in chunks:
            m.update(train.images[idx])
        return m

    items = PixelItems(train)
    loader = torch.utils.data.DataLoader(
        items, batch_sampler=chunks, num_workers=run.config.stats.workers
    )
    for x, _ in loader:
        m.update(x)
    return m


def data_warnings(run: Run, profile: dict[str, Any], headers: HeaderSummary | None) -> list[str]:
    """Where the recipe looks clearly off for this data, in words naming the config key."""
    cfg, p = run.config, run.config.preset_obj()
    v = profile["values"]
    out: list[str] = []
    if headers is not None and headers.short_sides and cfg.dataset.image_size is None:
        med = sorted(headers.short_sides)[len(headers.short_sides) // 2]
        if v["image_size"] > 2 * med:
            out.append(
                f"image size: the run resizes images whose median short side is {med} px up to "
                f"{v['image_size']} px (preset {p.name!r}); set dataset.image_size"
            )
    n = profile["train_images"]
    t = cfg.teacher_train(n)
    if not cfg.teachers.import_from and p.train_images and n != p.train_images:
        steps = t.epochs * math.ceil(n / t.batch_size)
        tuned = p.teacher.epochs * math.ceil(p.train_images / p.teacher.batch_size)
        if steps < tuned / 2:
            out.append(
                f"teachers: {steps:,} optimizer steps ({t.epochs} epoch(s) of "
                f"{math.ceil(n / t.batch_size):,} batches of {t.batch_size} over {n:,} images), "
                f"against the {tuned:,} that preset {p.name!r}'s recipe was tuned to make on "
                f"its {p.train_images:,} images; the teachers may end far from converged: "
                "raise teachers.train.epochs"
            )
    if t.batch_size > n:
        out.append(
            f"teachers.train.batch_size: {t.batch_size} is larger than the {n} training images"
        )
    return out
