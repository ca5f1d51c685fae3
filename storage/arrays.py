"""Zarr stores: full-dataset statistics (`stats.zarr`) and distilled images
(`synthesis/images.zarr`). Readable with plain `zarr.open_group(url)`.

A Zarr store is finished when the manifest records its checksum; until then readers of the
pipeline ignore it. Zarr's own resize-then-write is not atomic, so the images array is created
once at its full size and each batch fills its own chunk, committed by a batch record written
after the chunk (see storage/run.py: syn_commit).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import zarr

from .fs import RunFS


def _open_group(fs: RunFS, rel: str, mode: str) -> zarr.Group:
    opts = None if fs.local else fs.storage_options or None
    return zarr.open_group(fs.url(rel), mode=mode, storage_options=opts)  # type: ignore[arg-type]


# -- statistics ------------------------------------------------------------------------------
def write_teacher_stats(
    fs: RunFS,
    rel: str,
    teacher: int,
    layers: list[str],
    stats: list[tuple[int, torch.Tensor, torch.Tensor]],
    fingerprint: str,
) -> None:
    """stats.zarr/teacher_{m}/layer_{l:02d}/{mean (C,), cov (C, C)} float64, attrs: module,
    count (samples), dataset_fingerprint."""
    root = _open_group(fs, rel, "a")
    g = root.require_group(f"teacher_{teacher}")
    g.attrs.update({"layers": layers, "dataset_fingerprint": fingerprint})
    for i, (name, (n, mean, cov)) in enumerate(zip(layers, stats, strict=True)):
        lg = g.require_group(f"layer_{i:02d}")
        c = mean.shape[0]
        lg.create_array("mean", shape=(c,), dtype="float64", overwrite=True)[:] = mean.cpu().numpy()
        lg.create_array("cov", shape=(c, c), dtype="float64", overwrite=True)[:] = cov.cpu().numpy()
        lg.attrs.update({"module": name, "count": int(n), "channels": c})


def read_teacher_stats(fs: RunFS, rel: str, teacher: int) -> dict[str, Any]:
    """{'layers': [...], 'fingerprint': str, 'stats': [(count, mean, cov), ...]} float64."""
    g = _open_group(fs, rel, "r")[f"teacher_{teacher}"]
    assert isinstance(g, zarr.Group)
    layers = list(g.attrs["layers"])  # type: ignore[arg-type]
    out = []
    for i in range(len(layers)):
        lg = g[f"layer_{i:02d}"]
        mean = torch.from_numpy(np.asarray(lg["mean"][:]))  # type: ignore[index]
        cov = torch.from_numpy(np.asarray(lg["cov"][:]))  # type: ignore[index]
        out.append((int(lg.attrs["count"]), mean, cov))  # type: ignore[arg-type]
    return {"layers": layers, "fingerprint": g.attrs["dataset_fingerprint"], "stats": out}


# -- distilled images ------------------------------------------------------------------------
def create_images(
    fs: RunFS,
    rel: str,
    n: int,
    shape: tuple[int, int, int],
    batch: int,
    classes: torch.Tensor,
    attrs: dict[str, Any],
) -> None:
    """images (N, C, H, W) float32 in normalised space, one chunk per synthesis batch;
    classes (N,) int64. Created once at full size (no resizes later)."""
    g = _open_group(fs, rel, "a")
    if "images" in g:
        return
    g.create_array("classes", shape=(n,), dtype="int64", overwrite=True)[:] = classes.numpy()
    g.create_array(
        "images",
        shape=(n, *shape),
        chunks=(batch, *shape),
        dtype="float32",
        fill_value=np.nan,
        overwrite=True,
    )
    g.attrs.update(attrs)


def write_image_batch(fs: RunFS, rel: str, start: int, images: torch.Tensor) -> None:
    g = _open_group(fs, rel, "a")
    g["images"][start : start + len(images)] = images.detach().cpu().float().numpy()  # type: ignore[index]


def image_chunks(
    fs: RunFS, rel: str, chunk: int = 256
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, classes) `chunk` rows at a time: a whole ImageNet-scale set (IPC 50 at 224 px
    is 30 GB) never sits in memory at once."""
    g = _open_group(fs, rel, "r")
    images, classes = g["images"], g["classes"]
    for start in range(0, images.shape[0], chunk):  # type: ignore[union-attr]
        stop = start + chunk
        yield (
            torch.from_numpy(np.asarray(images[start:stop])),  # type: ignore[index]
            torch.from_numpy(np.asarray(classes[start:stop])),  # type: ignore[index]
        )


def read_image_rows(fs: RunFS, rel: str, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of an image store (one synthesis batch: its own chunk)."""
    g = _open_group(fs, rel, "r")
    return torch.from_numpy(np.asarray(g["images"][start:stop]))  # type: ignore[index]


def images_sha256(images: torch.Tensor) -> str:
    """SHA-256 of images as float32 bytes (a synthesis batch's commit record holds it)."""
    return hashlib.sha256(images.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()


def read_images(fs: RunFS, rel: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = _open_group(fs, rel, "r")
    images = torch.from_numpy(np.asarray(g["images"][:]))  # type: ignore[index]
    classes = torch.from_numpy(np.asarray(g["classes"][:]))  # type: ignore[index]
    return images, classes
