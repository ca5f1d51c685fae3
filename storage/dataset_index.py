"""The run's dataset index (`dataset/`): the listing of the source dataset, made once by the
process that holds the run's lock, read by every later stage and worker instead of listing and
fingerprinting the source again (an ImageFolder scan of ImageNet-21K's 11M files takes ~30 min).

- `dataset/index.json`: what was indexed (kind, source of each split), per split the classes,
  per-class counts and first rows, the sample count and the dataset fingerprint; written last,
  so it commits the column files it names (their byte size and SHA-256).
- `dataset/{split}.arrow` (ImageFolder trees): Arrow IPC columns `path` (relative to the split's
  folder), `class`, `size` (bytes), one row per sample in the sequential order (classes sorted,
  each class's files sorted: `scan_tree`'s). Read memory-mapped: a process holds pages of the
  file, shared by every process on the machine, not a Python list of the samples.
- Tar shards: index.json records each shard's name, byte size and sample count (no column file:
  the per-sample classes stay in the shards' own header index, storage/webdataset.py).

An index made from another kind or source is an error naming the file and the config key
(`read_index`). Remote run roots: the column files are written through the run's filesystem
and read from a local copy in the user's cache (`cache_dir`), named by its SHA-256.
Schema: docs/artifacts.md, "dataset/".
"""

from __future__ import annotations

import bisect
import hashlib
import json
import operator
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .folder_tree import class_files, class_folders
from .fs import RunFS
from .manifest import CorruptArtifact, content_sha256

INDEX = "dataset/index.json"
SCHEMA_VERSION = 1
CONFIG_KEYS = {"train": "dataset.path", "val": "dataset.val_path"}
LISTING_SCHEMA = pa.schema(
    [("path", pa.string()), ("class", pa.int32()), ("size", pa.int64())],
    metadata={"d3s_dataset_index": str(SCHEMA_VERSION)},
)
ROWS_PER_BATCH = 1 << 16  # Arrow record batches of about this many rows


def split_file(split: str) -> str:
    return f"dataset/{split}.arrow"


def source_of(path: str) -> str:
    """A split's source as the index records it: URLs as given, local paths absolute (a
    relative `dataset.path` names another folder from another working directory)."""
    return path if "://" in path else os.path.abspath(path)


def cache_dir() -> Path:
    """Local copies of the column files of remote run roots, named by their SHA-256."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "d3s" / "dataset-index"


# -- one ImageFolder tree as Arrow columns ------------------------------------------------------
class FolderListing:
    """The samples of one ImageFolder tree in the sequential order: columns `path`, `class`,
    `size` of `table`, memory-mapped from `file` (or in memory when `file` is None). Sample i's
    class is found from the per-class first rows (`starts`), its path in the record batch that
    holds row i: O(log) per sample, no per-sample Python objects."""

    def __init__(
        self,
        table: pa.Table,
        classes: list[str],
        counts: list[int],
        fingerprint: str,
        file: str | None = None,
    ):
        self.classes, self.fingerprint, self.file = list(classes), fingerprint, file
        self.counts = np.asarray(counts, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)  # (K+1,)
        self._starts = self.starts.tolist()  # bisect on a list: a fraction of np.searchsorted
        self._attach(table)

    def _attach(self, table: pa.Table) -> None:
        if table.num_rows != self.starts[-1]:
            raise ValueError(
                f"{self.file or 'dataset listing'}: {table.num_rows} rows, but the per-class "
                f"counts add up to {self.starts[-1]}"
            )
        self.table = table
        self._paths = table.column("path").chunks
        self._chunk_starts = np.cumsum([0] + [len(c) for c in self._paths]).tolist()

    @classmethod
    def scan(cls, root: str | os.PathLike[str]) -> FolderListing:
        """List the tree now, into memory (a reader that finds no index)."""
        batches: list[pa.RecordBatch] = []
        classes, counts, fingerprint = list_tree(root, batches.append)
        return cls(pa.Table.from_batches(batches, LISTING_SCHEMA), classes, counts, fingerprint)

    @classmethod
    def open(cls, file: str, classes: list[str], counts: list[int], fingerprint: str):
        """Memory-map a column file written by `list_tree`."""
        return cls(_read_mapped(file), classes, counts, fingerprint, file)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _row(self, i: int) -> int:
        i, n = operator.index(i), len(self)  # a numpy or 0-d tensor index too
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range 0..{n - 1}")
        return i % n

    def path(self, i: int) -> str:
        """Sample i's file, relative to the tree's folder."""
        i = self._row(i)
        k = bisect.bisect_right(self._chunk_starts, i) - 1
        return str(self._paths[k][i - self._chunk_starts[k]].as_py())

    def class_of(self, i: int) -> int:
        return bisect.bisect_right(self._starts, self._row(i)) - 1

    def __getstate__(self) -> dict[str, Any]:
        # A mapped listing travels as its file name (DataLoader workers, Dask): each process
        # maps the file again instead of receiving a pickled copy of every path.
        state = self.__dict__.copy()
        if self.file is not None:
            for key in ("table", "_paths", "_chunk_starts"):
                del state[key]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.file is not None:
            self._attach(_read_mapped(self.file))


def _read_mapped(file: str) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(file, "r")).read_all()


def list_tree(
    root: str | os.PathLike[str], emit: Callable[[pa.RecordBatch], None]
) -> tuple[list[str], list[int], str]:
    """List an ImageFolder tree class by class, in `scan_tree`'s order, handing `emit` record
    batches of LISTING_SCHEMA (ROWS_PER_BATCH rows or a few more: whole classes) as they fill,
    so no list of every file is held. Returns (classes, per-class counts, fingerprint), the
    fingerprint equal to `tree_fingerprint(root, scan_tree(root)[1])`."""
    base = Path(root)
    classes = class_folders(base)
    h = hashlib.sha256()
    counts: list[int] = []
    paths: list[str] = []
    labels: list[int] = []
    sizes: list[int] = []
    for c, name in enumerate(classes):
        rels = class_files(base, name)
        for rel in rels:
            size = (base / rel).stat().st_size
            h.update(f"{rel}\0{size}\0{c}\n".encode())
            sizes.append(size)
        paths += rels
        labels += [c] * len(rels)
        counts.append(len(rels))
        if len(paths) >= ROWS_PER_BATCH or c == len(classes) - 1:
            columns = [pa.array(paths, pa.string()), pa.array(labels, pa.int32())]
            emit(pa.record_batch([*columns, pa.array(sizes, pa.int64())], schema=LISTING_SCHEMA))
            paths, labels, sizes = [], [], []
    return classes, counts, "imagefolder:" + h.hexdigest()


# -- the index file ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetIndex:
    """index.json: `kind`, `splits` {split: entry}, `created`. An ImageFolder entry: source,
    samples, fingerprint, classes, counts, offsets, file, file_bytes, file_sha256; a tar-shard
    entry: source, samples, fingerprint, shards [{name, bytes, samples}]."""

    kind: str
    splits: dict[str, dict[str, Any]]
    created: str

    def folder_listing(self, fs: RunFS, split: str) -> FolderListing:
        """Split `split`'s columns, memory-mapped (checked against their recorded size and
        SHA-256 first)."""
        return _open_listing(fs, self.splits[split], verify=True)


def read_index(fs: RunFS, kind: str, sources: dict[str, str]) -> DatasetIndex | None:
    """The run's dataset index, None if none was written yet. `sources`: {split: path or URL
    from the config}. An index of another kind or made from another source is an error naming
    the file and the config key: the run's teachers and statistics were computed from the
    indexed data, and a silent re-index would mix two datasets in one run."""
    if not fs.exists(INDEX):
        return None
    where = fs.url(INDEX)
    try:
        data = json.loads(fs.read_bytes(INDEX))
        if SELF_SHA in data and data[SELF_SHA] != content_sha256(data, SELF_SHA):
            raise ValueError("its content does not match its own checksum")
        data["kind"], data["splits"], data["created"]  # noqa: B018 (present)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptArtifact(f"{where}: a damaged dataset index ({e})") from None
    remedy = (
        f"a different dataset needs a new run root; if the data only moved, delete "
        f"{fs.url('dataset')} and it is indexed again"
    )
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{where}: dataset index schema {data.get('schema_version')!r}, this version "
            f"reads {SCHEMA_VERSION}; delete {fs.url('dataset')} and it is indexed again"
        )
    if data["kind"] != kind:
        raise ValueError(
            f"{where}: indexes a {data['kind']!r} dataset, but dataset.kind is {kind!r}; {remedy}"
        )
    for split, path in sources.items():
        entry = data["splits"].get(split)
        made_from = None if entry is None else entry["source"]
        if made_from != source_of(path):
            raise ValueError(
                f"{where}: the {split} split was indexed from {made_from}, but "
                f"{CONFIG_KEYS[split]} is {source_of(path)}; {remedy}"
            )
    return DatasetIndex(data["kind"], data["splits"], data["created"])


def write_folder_split(
    fs: RunFS, split: str, root: str | os.PathLike[str]
) -> tuple[dict[str, Any], FolderListing]:
    """List ImageFolder tree `root` into `dataset/{split}.arrow` (atomically) and return its
    index entry and its memory-mapped listing. The caller holds the run's lock and commits the
    entries with `commit_index` once every split is written."""
    rel = split_file(split)
    with fs.atomic_local_path(rel) as tmp:
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, LISTING_SCHEMA) as writer:
            classes, counts, fingerprint = list_tree(root, writer.write_batch)
        digest, nbytes = _sha256(tmp), os.path.getsize(tmp)
        if not fs.local:  # readers on this machine map this copy instead of downloading it
            _cache_put(tmp, digest)
    entry = {
        "source": source_of(os.fspath(root)),
        "samples": int(sum(counts)),
        "fingerprint": fingerprint,
        "classes": classes,
        "counts": counts,
        "offsets": np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist(),
        "file": rel,
        "file_bytes": nbytes,
        "file_sha256": digest,
    }
    return entry, _open_listing(fs, entry, verify=False)


def commit_index(fs: RunFS, kind: str, splits: dict[str, dict[str, Any]]) -> DatasetIndex:
    """Write index.json (after the column files it names: it commits them)."""
    created = datetime.now(UTC).isoformat(timespec="seconds")
    data = {"schema_version": SCHEMA_VERSION, "kind": kind, "created": created, "splits": splits}
    data[SELF_SHA] = content_sha256(data)
    fs.write_bytes(INDEX, json.dumps(data, indent=1).encode())
    return DatasetIndex(kind, splits, created)


SELF_SHA = "self_sha256"  # of the rest of index.json: a changed byte that still parses is found


def remove_index(fs: RunFS) -> None:
    """Forget a damaged index: index.json first (it commits the column files), then those."""
    fs.remove(INDEX)
    for name in fs.listdir("dataset"):
        if name.endswith(".arrow"):
            fs.remove(f"dataset/{name}")


# -- column files: local path, checks, the cache of remote ones ---------------------------------
def _open_listing(fs: RunFS, entry: dict[str, Any], verify: bool) -> FolderListing:
    rel = entry["file"]
    if fs.local:
        local = fs.path(rel)
        if verify:
            _check(local, entry, fs.url(rel), fs)
    else:
        local = _cached_copy(fs, entry)
    return FolderListing.open(local, entry["classes"], entry["counts"], entry["fingerprint"])


def _check(local: str, entry: dict[str, Any], where: str, fs: RunFS) -> None:
    try:
        nbytes = os.path.getsize(local)
    except FileNotFoundError:
        nbytes = -1
    if nbytes != entry["file_bytes"] or _sha256(local) != entry["file_sha256"]:
        raise CorruptArtifact(
            f"{where}: does not match the dataset index ({entry['file_bytes']} bytes, sha256 "
            f"{entry['file_sha256'][:12]}... recorded in {fs.url(INDEX)}); the run's data "
            "stage (`d3s run`, `d3s data`) indexes the data again"
        )


def _cached_copy(fs: RunFS, entry: dict[str, Any]) -> str:
    """A local copy of a remote column file, downloaded once per machine, checked at open."""
    local = cache_dir() / f"{entry['file_sha256']}.arrow"
    if local.is_file():
        try:
            _check(str(local), entry, str(local), fs)
            return str(local)
        except CorruptArtifact:
            local.unlink(missing_ok=True)  # a damaged copy: fetched again
    with _cache_slot(local) as tmp:
        fs.fs.get_file(fs.path(entry["file"]), tmp)
        _check(tmp, entry, fs.url(entry["file"]), fs)
    return str(local)


def _cache_put(file: str, digest: str) -> None:
    with _cache_slot(cache_dir() / f"{digest}.arrow") as tmp:
        shutil.copyfile(file, tmp)


@contextmanager
def _cache_slot(local: Path) -> Iterator[str]:
    """A temporary file beside `local`, renamed to it on success (processes filling the same
    slot at once write the same bytes), removed on failure."""
    local.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=local.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, local)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _sha256(file: str) -> str:
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
