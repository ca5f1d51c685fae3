"""Zarr stores: full-dataset statistics (`stats.zarr`) and image sets (distilled:
`synthesis/images.zarr`; the baselines' real images, with their `train_indices`). Readable with
plain `zarr.open_group(url)`.

A Zarr store is finished when the manifest records its checksum; until then readers of the
pipeline ignore it. Zarr's own resize-then-write is not atomic, so the images array is created
once at its full size and each batch fills its own chunk, committed by a batch record written
after the chunk (see storage/layout.py: syn_commit).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import google_crc32c
import numpy as np
import torch
import zarr
from zarr.codecs import BytesCodec, ShardingCodec

from .fs import RunFS
from .manifest import REMEDY, CorruptArtifact

P = ParamSpec("P")
R = TypeVar("R")


def _open_group(fs: RunFS, rel: str, mode: str) -> zarr.Group:
    opts = None if fs.local else fs.storage_options or None
    return zarr.open_group(fs.url(rel), mode=mode, storage_options=opts)  # type: ignore[arg-type]


@contextmanager
def readable(fs: RunFS, rel: str) -> Iterator[None]:
    """Zarr's and the codecs' errors on a damaged store (a checksum that fails, metadata that
    is not JSON, a chunk of the wrong size: ValueError, KeyError, TypeError) as CorruptArtifact
    naming the store, with the remedy; I/O errors pass through (retried where transient)."""
    try:
        yield
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptArtifact(
            f"{fs.url(rel)}: cannot be read ({type(e).__name__}: {e}); "
            + REMEDY.format(root=fs.url()),
            rel,
        ) from None


def _reads(fn: Callable[P, R]) -> Callable[P, R]:
    """`readable` around a reader whose first two arguments are (fs, rel)."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        fs, rel = args[0], args[1]
        assert isinstance(fs, RunFS) and isinstance(rel, str)
        with readable(fs, rel):
            return fn(*args, **kwargs)

    return wrapper


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


@_reads
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

    Layout: one shard (one file) per `batch` rows, holding one uncompressed inner chunk per
    image. A synthesis batch is written as one whole shard; labelling and students read any rows
    in any order, each row a byte-range read of its own chunk (with chunk = batch, a random label
    batch of 100 rows would decode 100 chunks of 200 images each: 12 GB per batch at 224 px)."""
    g = _open_group(fs, rel, "a")
    if "images" in g:
        return
    g.create_array("classes", shape=(n,), dtype="int64", overwrite=True)[:] = classes.numpy()
    g.create_array(
        "images",
        shape=(n, *shape),
        shards=(batch, *shape),
        chunks=(1, *shape),
        compressors=None,  # float images compress by ~5%; raw rows are read without decoding
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
    with readable(fs, rel):
        g = _open_group(fs, rel, "r")
        images, classes = g["images"], g["classes"]
    for start in range(0, images.shape[0], chunk):  # type: ignore[union-attr]
        stop = start + chunk
        with readable(fs, rel):
            got = (
                torch.from_numpy(np.asarray(images[start:stop])),  # type: ignore[index]
                torch.from_numpy(np.asarray(classes[start:stop])),  # type: ignore[index]
            )
        yield got


def read_image_rows(fs: RunFS, rel: str, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of an image store (one synthesis batch: its own shard)."""
    return ImageRows(fs, rel).__getitems__(range(start, stop))


def images_sha256(images: torch.Tensor) -> str:
    """SHA-256 of images as float32 bytes (a synthesis batch's commit record holds it)."""
    return hashlib.sha256(images.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()


@_reads
def shard_starts(fs: RunFS, rel: str) -> list[int]:
    """The first row of each shard of an image store (of each synthesis batch: one shard each)."""
    array = _open_group(fs, rel, "r")["images"]
    rows = int(array.metadata.chunk_grid.chunk_shape[0])  # type: ignore[union-attr]
    return list(range(0, int(array.shape[0]), rows))  # type: ignore[union-attr]


def drop_image_shards(fs: RunFS, rel: str, first_row: int) -> None:
    """Delete the shard files of the rows from `first_row` on (a shard boundary: synthesis
    writes one batch per shard), so that rewriting those batches never reads a damaged shard
    back (Zarr reads a shard's index before writing into it)."""
    with readable(fs, rel):
        array = _open_group(fs, rel, "r")["images"]
        rows = int(array.metadata.chunk_grid.chunk_shape[0])  # type: ignore[union-attr]
        n, *rest = (int(d) for d in array.shape)  # type: ignore[union-attr]
        key = array.metadata.encode_chunk_key  # type: ignore[union-attr]
    if first_row % rows:
        raise ValueError(f"{fs.url(rel)}: row {first_row} is not a shard boundary ({rows} rows)")
    for s in range(first_row // rows, -(-n // rows)):
        fs.remove(f"{rel}/images/{key((s, *[0] * len(rest)))}")


@_reads
def read_images(fs: RunFS, rel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole set in memory: small sets and tests only (stages stream: `ImageRows`)."""
    g = _open_group(fs, rel, "r")
    images = torch.from_numpy(np.asarray(g["images"][:]))  # type: ignore[index]
    classes = torch.from_numpy(np.asarray(g["classes"][:]))  # type: ignore[index]
    return images, classes


@_reads
def read_classes(fs: RunFS, rel: str) -> torch.Tensor:
    """(N,) int64 class of each image (8 bytes per image: 0.8 MB at ImageNet-21K)."""
    return torch.from_numpy(np.asarray(_open_group(fs, rel, "r")["classes"][:]))  # type: ignore[index]


@_reads
def image_count(fs: RunFS, rel: str) -> int:
    return int(_open_group(fs, rel, "r")["images"].shape[0])  # type: ignore[union-attr]


# -- real-image sets (the baselines) ---------------------------------------------------------
TRAIN_INDICES = "train_indices"


def write_train_indices(fs: RunFS, rel: str, order: torch.Tensor) -> None:
    """`train_indices` (N,) int64 of an image store of real images: the training sample of
    each row."""
    g = _open_group(fs, rel, "a")
    g.create_array(TRAIN_INDICES, shape=order.shape, dtype="int64", overwrite=True)[:] = (
        order.numpy()
    )


@_reads
def train_indices(fs: RunFS, rel: str) -> torch.Tensor:
    """(N,) int64 training sample of each row of a baseline image store (the `train_indices`
    array; stores written before it have the list in their attributes)."""
    g = _open_group(fs, rel, "r")
    if TRAIN_INDICES in g:
        return torch.from_numpy(np.asarray(g[TRAIN_INDICES][:]))  # type: ignore[index]
    return torch.tensor(g.attrs[TRAIN_INDICES], dtype=torch.int64)  # type: ignore[arg-type]


_EMPTY = 2**64 - 1  # a shard index entry of an inner chunk never written


class _RawShards:
    """Rows of a local sharded images array whose inner chunks are single uncompressed
    little-endian rows (the layout `create_images` makes), read straight from the shard files
    with os.pread: the shard's index (offset, length per row, at its end, Zarr v3 sharding
    spec), then the row's bytes. About 20x faster per row than Zarr's general path, which at
    one row per chunk costs ~1-3 ms a row (300 s per label epoch at ImageNet-21K). Checked
    against Zarr's own reader in tests/test_streaming_labels.py. `layout` is None for any other
    store (compressed, other chunking, remote): the caller uses Zarr."""

    def __init__(self, path: str, store: str, array: Any):
        self.path, self.store = path, store
        self.dtype = np.dtype(array.dtype)
        self.row_shape = tuple(array.shape[1:])
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
        self.shard_rows = int(array.metadata.chunk_grid.chunk_shape[0])
        self.index_bytes = 16 * self.shard_rows + 4  # (offset, nbytes) uint64 pairs + crc32c
        self._index: dict[int, np.ndarray] = {}

    @staticmethod
    def layout(fs: RunFS, rel: str, array: Any) -> _RawShards | None:
        try:
            codecs = array.metadata.codecs
            sharding = codecs[0] if len(codecs) == 1 else None
            ok = (
                fs.local
                and isinstance(sharding, ShardingCodec)
                and tuple(sharding.chunk_shape) == (1, *array.shape[1:])
                and len(sharding.codecs) == 1
                and isinstance(sharding.codecs[0], BytesCodec)
                and str(getattr(sharding.codecs[0].endian, "value", "little")) == "little"
                and str(getattr(sharding.index_location, "value", "end")) == "end"
                and array.metadata.chunk_key_encoding.separator == "/"
                and np.dtype(array.dtype).byteorder in "=<|"
            )
        except AttributeError:
            return None
        return _RawShards(fs.path(rel), rel, array) if ok else None

    def _shard_file(self, s: int) -> str:
        return f"{self.path}/images/c/{s}" + "/0" * len(self.row_shape)

    def _offsets(self, s: int, fd: int) -> np.ndarray:
        if s not in self._index:
            size = os.fstat(fd).st_size
            raw = os.pread(fd, self.index_bytes, max(0, size - self.index_bytes))
            # The index's CRC-32C (as Zarr checks it): a truncated or overwritten shard is
            # refused here, not read as rows of whatever bytes now sit at the recorded offsets.
            if len(raw) != self.index_bytes or google_crc32c.value(raw[:-4]) != int.from_bytes(
                raw[-4:], "little"
            ):
                raise ValueError("its shard index fails its CRC-32C check (truncated or damaged)")
            if len(self._index) > 1024:
                self._index.clear()
            offsets = np.frombuffer(raw[:-4], "<u8").reshape(-1, 2)
            written = offsets[offsets[:, 0] != _EMPTY]
            if len(written) and int((written[:, 0] + written[:, 1]).max()) > size:
                raise ValueError("its index points past the end of the file (truncated)")
            self._index[s] = offsets
        return self._index[s]

    def read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.row_shape), self.dtype)
        flat = out.reshape(len(rows), -1).view(np.uint8)
        shards = rows // self.shard_rows
        for s in np.unique(shards):
            at = np.nonzero(shards == s)[0]
            try:
                fd = os.open(self._shard_file(int(s)), os.O_RDONLY)
            except FileNotFoundError:
                out[at] = np.nan  # a shard never written: the fill value
                continue
            try:
                offsets = self._offsets(int(s), fd)
                for i in at:
                    offset, nbytes = offsets[rows[i] % self.shard_rows]
                    if offset == _EMPTY:
                        out[i] = np.nan
                        continue
                    if nbytes != self.row_bytes:
                        raise ValueError(f"row {rows[i]} is {nbytes} bytes, not {self.row_bytes}")
                    flat[i] = np.frombuffer(os.pread(fd, self.row_bytes, int(offset)), np.uint8)
            except ValueError as e:
                raise CorruptArtifact(
                    f"{self._shard_file(int(s))}: cannot be read: {e}", self.store
                ) from None
            finally:
                os.close(fd)
        return out


class ImageRows(torch.utils.data.Dataset):
    """Rows of an image store, read on demand: `ds[indices]` (a list, any order, repeats
    allowed) gives those rows as one (len, C, H, W) float32 tensor. Made for a DataLoader with a
    batch sampler (`__getitems__`): each worker opens the store once, reads only the rows of its
    batch (one inner chunk each), and the main process never holds more than the batches in
    flight. Memory: one batch of rows (100 images at 224 px: 60 MB) per prefetched batch.
    Local stores in `create_images`' layout are read with `_RawShards`, others through Zarr."""

    def __init__(self, fs: RunFS, rel: str):
        self.fs, self.rel = fs, rel
        self._array: Any = None
        self._raw: _RawShards | None = None
        self.n = image_count(fs, rel)

    def __getstate__(self) -> dict[str, Any]:  # workers open their own handle
        return {**self.__dict__, "_array": None, "_raw": None}

    def _images(self) -> Any:
        if self._array is None:
            with readable(self.fs, self.rel):
                self._array = _open_group(self.fs, self.rel, "r")["images"]
            self._raw = _RawShards.layout(self.fs, self.rel, self._array)
        return self._array

    def __len__(self) -> int:
        return self.n

    def __getitems__(self, indices) -> torch.Tensor:
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"{self.fs.url(self.rel)}: rows {idx.min()}..{idx.max()} of {self.n}")
        array = self._images()
        if self._raw is not None:
            return torch.from_numpy(self._raw.read(idx))
        uniq, inverse = np.unique(idx, return_inverse=True)
        with readable(self.fs, self.rel):
            rows = np.asarray(array.get_orthogonal_selection((uniq,)))
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
