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
    """images (N, C, H, W) float32 in normalised space; classes (N,) int64. Created once at
    full size (no resizes later).

    Layout: one shard (one file) per `batch` rows, holding one inner chunk per image. A
    synthesis batch is written as one whole shard; labelling and students read any rows in any
    order, each row a byte-range read of its own chunk (with chunk = batch, a random label batch
    of 100 rows would decode 100 chunks of 200 images each: 12 GB per batch at 224 px)."""
    g = _open_group(fs, rel, "a")
    if "images" in g:
        return
    g.create_array("classes", shape=(n,), dtype="int64", overwrite=True)[:] = classes.numpy()
    g.create_array(
        "images",
        shape=(n, *shape),
        shards=(batch, *shape),
        chunks=(1, *shape),
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
    """The whole set in memory: small sets and tests only (stages stream: `ImageRows`)."""
    g = _open_group(fs, rel, "r")
    images = torch.from_numpy(np.asarray(g["images"][:]))  # type: ignore[index]
    classes = torch.from_numpy(np.asarray(g["classes"][:]))  # type: ignore[index]
    return images, classes


def read_classes(fs: RunFS, rel: str) -> torch.Tensor:
    """(N,) int64 class of each image (8 bytes per image: 0.8 MB at ImageNet-21K)."""
    return torch.from_numpy(np.asarray(_open_group(fs, rel, "r")["classes"][:]))  # type: ignore[index]


def image_count(fs: RunFS, rel: str) -> int:
    return int(_open_group(fs, rel, "r")["images"].shape[0])  # type: ignore[union-attr]


class ImageRows(torch.utils.data.Dataset):
    """Rows of an image store, read on demand: `ds[indices]` (a list, any order, repeats
    allowed) gives those rows as one (len, C, H, W) float32 tensor. Made for a DataLoader with a
    batch sampler (`__getitems__`): each worker opens the store once, reads only the rows of its
    batch (one inner chunk each), and the main process never holds more than the batches in
    flight. Memory: one batch of rows (100 images at 224 px: 60 MB) per prefetched batch."""

    def __init__(self, fs: RunFS, rel: str):
        self.fs, self.rel = fs, rel
        self._array: Any = None
        self.n = image_count(fs, rel)

    def __getstate__(self) -> dict[str, Any]:  # workers open their own handle
        return {**self.__dict__, "_array": None}

    def _images(self) -> Any:
        if self._array is None:
            self._array = _open_group(self.fs, self.rel, "r")["images"]
        return self._array

    def __len__(self) -> int:
        return self.n

    def __getitems__(self, indices) -> torch.Tensor:
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"{self.fs.url(self.rel)}: rows {idx.min()}..{idx.max()} of {self.n}")
        uniq, inverse = np.unique(idx, return_inverse=True)
        rows = np.asarray(self._images().get_orthogonal_selection((uniq,)))
        return torch.from_numpy(rows[inverse])

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.__getitems__([i])[0]


def _rows_collate(batch: torch.Tensor) -> torch.Tensor:
    return batch


def row_batches(
    fs: RunFS,
    rel: str,
    batches: Any,
    device: str = "cpu",
    workers: int = 0,
) -> Iterator[torch.Tensor]:
    """The rows of each index list in `batches` (an iterable of index sequences, consumed
    lazily), on `device`, through one DataLoader: `workers` processes read ahead (2 batches
    each), pinned memory and asynchronous copies on CUDA."""
    loader = torch.utils.data.DataLoader(
        ImageRows(fs, rel),
        batch_sampler=batches,
        collate_fn=_rows_collate,  # type: ignore[arg-type]
        num_workers=workers,
        pin_memory=device.startswith("cuda"),
        persistent_workers=False,
    )
    for x in loader:
        yield x.to(device, non_blocking=True)
