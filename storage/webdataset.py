"""Tar-sharded datasets (the WebDataset layout): shards `train-000000.tar`, ... each holding
samples as consecutive members sharing a key, `KEY.jpg|jpeg|png|webp` (the image) and `KEY.cls`
(the class index, an ASCII integer), read from a local path or any fsspec URL.

The sequential order is shard by shard (in the order given; a directory's `*.tar` sorted by
name), sample by sample in member order. Each shard gets a member index (byte offset and size
of every sample's image, its class) from one pass over its tar headers: member data is skipped,
only the tiny `.cls` members are read. It is built when the shard is first touched and kept by
the process (the last `CACHED_SHARDS` shards). A run of consecutive samples is then one
byte-range read per shard, so reading batches [a, b) costs decoding those samples, no listing.

Sample counts: a `sizes.json` beside the shards ({"train-000000.tar": n, ...}, the convention
of open_clip and img2dataset) gives len() without touching the shards, and is checked against
each shard's index when that shard is read. Without it, len() indexes every shard once. A run
records the counts, byte sizes and fingerprint in its dataset index (storage/dataset_index.py)
the first time; later opens pass them in (`listing=`) and touch no shard for them.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch

from .imagefolder import CROP_RATIO, decode_image, image_header, model_input, pixels

IMAGE_FIELDS = {"jpg", "jpeg", "png", "webp"}
SIZES_FILE = "sizes.json"
CACHED_SHARDS = 16
_BRACES = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar (zero-padded like the first bound);
    `{x,y}` -> x, y. Groups expand left to right."""
    m = _BRACES.search(pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    items = (
        [f"{i:0{len(r.group(1))}d}" for i in range(int(r.group(1)), int(r.group(2)) + 1)]
        if r
        else body.split(",")
    )
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [x for item in items for x in expand_braces(head + item + tail)]


def resolve_shards(
    spec: str | Sequence[str], storage_options: dict[str, Any]
) -> tuple[fsspec.AbstractFileSystem, list[str], str]:
    """(filesystem, shard paths in order, display prefix) from a directory, a brace pattern, one
    tar file or a list of those, as paths or URLs of one filesystem."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls = [u for s in specs for u in expand_braces(s)]
    if not urls:
        raise ValueError("no tar shards given")
    fs, _ = fsspec.core.url_to_fs(urls[0], **storage_options)
    paths: list[str] = []
    for url in urls:
        path = fs._strip_protocol(url)
        if path.endswith(".tar"):
            paths.append(path)
        elif fs.isdir(path):
            found = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".tar"))
            if not found:
                raise ValueError(f"{url}: folder holds no .tar shards")
            paths += found
        else:
            raise FileNotFoundError(f"{url}: neither a folder of .tar shards nor a .tar file")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return fs, paths, "" if protocol in ("file", "local") else f"{protocol}://"


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the member path up to the first dot of its last part, the
    field is the rest ("a/n015_1.JPEG" -> ("a/n015_1", "JPEG"))."""
    folder, _, base = name.rpartition("/")
    stem, dot, field = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (field if dot else "")


@dataclass
class ShardIndex:
    """One shard's samples: image data byte offset and size, class, image member names."""

    offsets: np.ndarray  # (n,) int64 bytes from the start of the tar
    sizes: np.ndarray  # (n,) int64 bytes
    classes: np.ndarray  # (n,) int64
    names: np.ndarray  # (n,) image member names, UTF-8 bytes (compact: only errors need them)

    def name(self, j: int) -> str:
        return bytes(self.names[j]).decode()


def index_shard(
    fs: fsspec.AbstractFileSystem, path: str, where: str, num_classes: int | None
) -> ShardIndex:
    """One pass over the tar headers of shard `path` (shown as `where` in errors)."""
    samples: list[tuple[str, tarfile.TarInfo | None, int | None]] = []

    def close(key: str, image: tarfile.TarInfo | None, cls: int | None) -> None:
        if image is None:
            raise ValueError(
                f"{where}: sample {key!r} has no image (.{'/.'.join(sorted(IMAGE_FIELDS))})"
            )
        if cls is None:
            raise ValueError(f"{where}: {image.name}: sample {key!r} has no .cls member")
        samples.append((key, image, cls))

    try:
        f = fs.open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: tar shard does not exist") from None
    with f:
        key, image, cls, last = None, None, None, "(none)"
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
            for m in tf:
                last = m.name
                if not m.isfile():
                    continue
                k, field = split_key(m.name)
                if k != key:
                    if key is not None:
                        close(key, image, cls)
                    key, image, cls = k, None, None
                field = field.lower()
                if field in IMAGE_FIELDS:
                    if image is not None:
                        raise ValueError(f"{where}: {m.name}: sample {k!r} has two images")
                    image = m
                elif field == "cls":
                    cls = _parse_class(tf, m, where, num_classes)
            if key is not None:
                close(key, image, cls)
            end = tf.offset
        except tarfile.TarError as e:
            raise ValueError(
                f"{where}: truncated or damaged tar file after member {last} ({e})"
            ) from None
        f.seek(end)
        if f.read(2 * tarfile.BLOCKSIZE) != bytes(2 * tarfile.BLOCKSIZE):
            raise ValueError(
                f"{where}: truncated tar file (no end-of-archive after member {last}, byte {end})"
            )
    if not samples:
        raise ValueError(f"{where}: tar shard holds no samples")
    return ShardIndex(
        offsets=np.array([m.offset_data for _, m, _ in samples], dtype=np.int64),  # type: ignore[union-attr]
        sizes=np.array([m.size for _, m, _ in samples], dtype=np.int64),  # type: ignore[union-attr]
        classes=np.array([c for _, _, c in samples], dtype=np.int64),
        names=np.array([m.name.encode() for _, m, _ in samples], dtype=bytes),  # type: ignore[union-attr]
    )


def _parse_class(tf: tarfile.TarFile, m: tarfile.TarInfo, where: str, num_classes: int | None):
    raw = tf.extractfile(m).read()  # type: ignore[union-attr]
    try:
        c = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"{where}: {m.name}: class is not an integer ({raw[:20]!r})") from None
    if num_classes is not None and not 0 <= c < num_classes:
        raise ValueError(f"{where}: {m.name}: class {c} outside 0..{num_classes - 1}")
    return c


class TarShardDataset(torch.utils.data.Dataset):
    """Samples of tar shards, preprocessed like ImageFolderDataset: (C, size, size) float32 in
    normalised space (short side to size * 8/7, centre crop) and the class index.

    Map-style, so DataLoader workers split the work batch by batch and keep the sequential
    order; `__getitems__` serves a batch of consecutive samples with one read per shard.
    `shards`: a directory, a brace pattern (`.../train-{000000..000146}.tar`), a tar file or a
    list of those, local or fsspec URLs. Class indices must lie in 0..num_classes-1."""

    def __init__(
        self,
        shards: str | Sequence[str],
        size: int,
        in_chans: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        num_classes: int | None,
        storage_options: dict[str, Any] | None = None,
        listing: dict[str, Any] | None = None,
        crop_ratio: float = CROP_RATIO,
        to_grey: bool = False,
    ):
        self.fs, self.paths, self._prefix = resolve_shards(shards, storage_options or {})
        self.size, self.in_chans = size, in_chans
        self.crop_ratio, self.to_grey = crop_ratio, to_grey
        self.mean, self.std = list(mean), list(std)
        self.num_classes = num_classes
        self.classes = list(range(num_classes or 0))
        self._fingerprint: str | None = None
        if listing is None:
            self._counts_from = f"{SIZES_FILE} beside it"
            sizes = self._read_sizes()
            self._counts: list[int | None] = [sizes.get(posixpath.basename(p)) for p in self.paths]
        else:
            self._counts_from = "the run's dataset index"
            self._counts = self._known_counts(listing)
            self._fingerprint = listing["fingerprint"]
        self._index: OrderedDict[int, ShardIndex] = OrderedDict()
        self._classes: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    # -- names and sizes --------------------------------------------------------------------
    def where(self, k: int) -> str:
        """Shard k as shown in errors: its path or URL."""
        return self._prefix + self.paths[k]

    def _read_sizes(self) -> dict[str, int]:
        path = posixpath.join(posixpath.dirname(self.paths[0]), SIZES_FILE)
        try:
            raw = self.fs.cat_file(path)
        except FileNotFoundError:
            return {}
        try:
            sizes = json.loads(raw)
            return {str(k): int(v) for k, v in sizes.items()}
        except (ValueError, AttributeError, TypeError):
            raise ValueError(
                f"{self._prefix}{path}: expected a JSON object {{shard name: sample count}}"
            ) from None

    def _known_counts(self, listing: dict[str, Any]) -> list[int | None]:
        """Sample counts from a dataset-index entry (`listing()`), whose shards must be these."""
        names = [s["name"] for s in listing["shards"]]
        if names != [self.where(k) for k in range(len(self.paths))]:
            raise ValueError(
                f"{self.where(0)}: the shards are not those of the run's dataset index "
                f"({len(self.paths)} shards here, {len(names)} indexed); the data changed "
                "after it was indexed"
            )
        return [int(s["samples"]) for s in listing["shards"]]

    def counts(self) -> list[int]:
        """Samples per shard (sizes.json, else one header pass per shard not yet indexed)."""
        for k, n in enumerate(self._counts):
            if n is None:
                self.shard_index(k)
        return [int(n) for n in self._counts]  # type: ignore[arg-type]

    def __len__(self) -> int:
        return sum(self.counts())

    def _bytes(self, k: int) -> int:
        try:
            return int(self.fs.size(self.paths[k]))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.where(k)}: tar shard does not exist") from None

    def fingerprint(self) -> str:
        """Hash of every shard's name, byte size and sample count (not of its bytes); from the
        run's dataset index where it came from one."""
        if self._fingerprint is None:
            self._fingerprint = self.listing()["fingerprint"]
        return self._fingerprint

    def listing(self) -> dict[str, Any]:
        """These shards as the dataset index records them: samples, fingerprint, and each
        shard's name (path or URL), byte size and sample count, in order (one size query
        per shard; sample counts as `counts`)."""
        h = hashlib.sha256()
        shards = []
        for k, n in enumerate(self.counts()):
            size = self._bytes(k)
            h.update(f"{posixpath.basename(self.paths[k])}\0{size}\0{n}\n".encode())
            shards.append({"name": self.where(k), "bytes": size, "samples": n})
        return {
            "samples": sum(s["samples"] for s in shards),
            "fingerprint": "webdataset:" + h.hexdigest(),
            "shards": shards,
        }

    # -- the index ----------------------------------------------------------------------------
    def shard_index(self, k: int) -> ShardIndex:
        """Shard k's member index: cached, else one pass over its tar headers."""
        with self._lock:
            if k in self._index:
                self._index.move_to_end(k)
                return self._index[k]
        idx = index_shard(self.fs, self.paths[k], self.where(k), self.num_classes)
        n = len(idx.offsets)
        if self._counts[k] is not None and self._counts[k] != n:
            raise ValueError(
                f"{self.where(k)}: holds {n} samples, but {self._counts_from} says "
                f"{self._counts[k]}"
            )
        with self._lock:
            self._counts[k] = n
            self._classes[k] = idx.classes
            self._index[k] = idx
            while len(self._index) > CACHED_SHARDS:
                self._index.popitem(last=False)
        return idx

    def _locate(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(shard, position in shard) of each global sample index."""
        starts = np.cumsum([0, *self.counts()])
        i = np.asarray(indices, dtype=np.int64)
        if len(i) and (i.min() < 0 or i.max() >= starts[-1]):
            raise IndexError(f"sample index out of range 0..{starts[-1] - 1}")
        k = np.searchsorted(starts, i, side="right") - 1
        return k, i - starts[k]

    def index_range(self, start: int, stop: int) -> None:
        """Index the shards holding samples [start, stop) now (before DataLoader workers fork,
        so that they inherit the index instead of each building it)."""
        if stop > start:
            first, last = self._locate([start, stop - 1])[0].tolist()
            for k in range(first, min(last + 1, first + CACHED_SHARDS)):
                self.shard_index(k)

    def sample_classes(self) -> torch.Tensor:
        """(N,) class of every sample in order (one header pass per shard not yet indexed)."""
        for k in range(len(self.paths)):
            if k not in self._classes:
                self.shard_index(k)
        return torch.from_numpy(np.concatenate([self._classes[k] for k in range(len(self.paths))]))

    def shuffled_order(self, generator: torch.Generator, shards_at_once: int = 4) -> list[int]:
        """A seeded epoch order that stays within a few shards at a time: the shards permuted,
        then the samples of each group of `shards_at_once` consecutive shards permuted together
        (WebDataset's shard shuffle + buffer shuffle, without reading every shard at once)."""
        starts = np.cumsum([0, *self.counts()])
        shards = torch.randperm(len(self.paths), generator=generator).tolist()
        order: list[int] = []
        for g in range(0, len(shards), shards_at_once):
            pool = torch.cat(
                [torch.arange(starts[k], starts[k + 1]) for k in shards[g : g + shards_at_once]]
            )
            order += pool[torch.randperm(len(pool), generator=generator)].tolist()
        return order

    # -- reading ------------------------------------------------------------------------------
    def _read(self, k: int, js: np.ndarray) -> list[tuple[bytes, str, int]]:
        """(image bytes, member name, class) of samples js of shard k: one read when they are
        close together, one read each otherwise."""
        idx = self.shard_index(k)
        starts, ends = idx.offsets[js], idx.offsets[js] + idx.sizes[js]
        lo, hi = int(starts.min()), int(ends.max())
        try:
            if hi - lo <= 2 * int((ends - starts).sum()) + (1 << 20):
                blob = self.fs.cat_file(self.paths[k], start=lo, end=hi)
                datas = [blob[s - lo : e - lo] for s, e in zip(starts, ends, strict=True)]
            else:
                datas = [
                    self.fs.cat_file(self.paths[k], start=int(s), end=int(e))
                    for s, e in zip(starts, ends, strict=True)
                ]
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.where(k)}: tar shard does not exist") from None
        out = []
        for j, data, s, e in zip(js.tolist(), datas, starts, ends, strict=True):
            if len(data) != e - s:
                raise ValueError(f"{self.where(k)}: {idx.name(j)}: truncated tar file")
            out.append((data, idx.name(j), int(idx.classes[j])))
        return out

    def _items(self, indices: Sequence[int], raw: bool) -> list[tuple[torch.Tensor, int]]:
        shard, pos = self._locate(indices)
        out: list[Any] = [None] * len(indices)
        for k in dict.fromkeys(shard.tolist()):
            where = np.nonzero(shard == k)[0]
            for slot, (data, name, c) in zip(where, self._read(k, pos[where]), strict=True):
                img = decode_image(
                    io.BytesIO(data), f"{self.where(k)}: {name}", self.in_chans, self.to_grey
                )
                if raw:
                    out[slot] = (pixels(img, self.size, self.crop_ratio), c)
                else:
                    x = model_input(img, self.size, self.mean, self.std, self.crop_ratio)
                    out[slot] = (x, c)
        return out

    def headers(self, indices: Sequence[int]) -> list[tuple[str, int, int, str]]:
        """[(mode, width, height, member)] of samples `indices`, from the image headers (the
        image bytes are read, not decoded)."""
        shard, pos = self._locate(indices)
        out: list[Any] = [None] * len(indices)
        for k in dict.fromkeys(shard.tolist()):
            where = np.nonzero(shard == k)[0]
            for slot, (data, name, _) in zip(where, self._read(k, pos[where]), strict=True):
                at = f"{self.where(k)}: {name}"
                out[slot] = (*image_header(io.BytesIO(data), at), at)
        return out

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        return self._items(indices, raw=False)

    def pixel_items(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        """[((C, size, size) uint8, class)]: the samples before normalisation, one read per
        shard like __getitems__ (storage.datasets.PixelItems)."""
        return self._items(indices, raw=True)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.__getitems__([i])[0]

    # -- pickling (DataLoader workers, Dask) ----------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        state["_classes"] = {}  # workers read images; the class list stays with the parent
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
