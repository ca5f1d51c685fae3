"""Soft labels: a Parquet dataset partitioned by epoch, `labels/epoch=N/part-0.parquet`.

Columns (named, never positional), schema version 2: epoch, batch, position int32, image_index
int32, crop_x0/crop_y0/crop_x1/crop_y1 uint16 (the normalised box as q = round(x * 65535), read
back as float32 q / 65535: exactly the box `label_epoch` labelled, see
d3s_core.augment.quantise_boxes), flip bool, and either `logits`
fixed_size_list<float32|float16>[classes] (dense) or `topk_indices` fixed_size_list<int16>[k]
(int32 above 32767 classes) + `topk_values` fixed_size_list<float16>[k] (top-k of the ensemble
logits) + `topk_rest` float16 (the mean of the other logits, what they are read back as).
Top-k values are float16 like the default dense format: 3 significant digits, and logits beyond
+-65504 would become inf.

Version 1 files (float32 boxes, int64 image_index, int32 indices, float32 top-k values and
rest) still read: `read_epoch` goes by each column's type. The schema version and label format
are in each file's metadata and in `labels/_schema.json`. Each file is written to a temporary
name and renamed (or uploaded whole), so a killed write never leaves a footer-less file under
the real name.

One row group per label batch, in batch order (`write_epoch_batches`), so an epoch is written
and read one batch at a time (`read_epoch_batches`, `epoch_image_batches`); files written
before hold one row group for the whole epoch and are read whole, then split by `batch`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from d3s_core.augment import box_codes, boxes_from_codes
from d3s_core.labelling import EpochLabels, batch_rows

from .fs import RunFS
from .manifest import CorruptArtifact

LABELS_SCHEMA_VERSION = 2
LabelFormat = Literal["fp32", "fp16", "topk"]
BOX_COLUMNS = ("crop_x0", "crop_y0", "crop_x1", "crop_y1")
INT16_CLASSES = 32767  # top-k indices are int16 up to this many classes, int32 above
# pq.write_table options. Dictionaries only where values repeat: on floats, image_index and
# boxes (near-unique) a dictionary page is tried, kept up to 1 MiB and costs bytes and time;
# zstd instead of snappy. At ImageNet-1K shape (10,000 rows, 1000 classes) this takes a top-1
# row from 31 to 17 bytes and writes + reads a fp16 epoch faster (measured in docs/labels.md).
WRITE_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "use_dictionary": ["epoch", "batch", "position", "flip", "topk_indices.list.element"],
}


def _fixed(values: np.ndarray, pa_type: pa.DataType) -> pa.FixedSizeListArray:
    n, k = values.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=pa_type), k)


def _image_index(index: torch.Tensor) -> np.ndarray:
    if len(index) and int(index.max()) >= 2**31:
        raise ValueError(
            f"image_index {int(index.max())} does not fit the int32 image_index column "
            f"(at most {2**31 - 1})"
        )
    return index.numpy().astype(np.int32)


def epoch_table(lab: EpochLabels, fmt: LabelFormat, k: int = 10) -> pa.Table:
    codes = box_codes(lab.boxes).numpy().astype(np.uint16)
    cols: dict[str, pa.Array] = {
        "epoch": pa.array(np.full(len(lab.batch), lab.epoch, np.int32)),
        "batch": pa.array(lab.batch.numpy().astype(np.int32)),
        "position": pa.array(lab.position.numpy().astype(np.int32)),
        "image_index": pa.array(_image_index(lab.image_index)),
        **{c: pa.array(codes[:, j]) for j, c in enumerate(BOX_COLUMNS)},
        "flip": pa.array(lab.flips.numpy().astype(bool)),
    }
    logits = lab.logits.float()
    classes = logits.shape[1]
    if fmt == "fp32":
        cols["logits"] = _fixed(logits.numpy(), pa.float32())
    elif fmt == "fp16":
        cols["logits"] = _fixed(logits.half().numpy(), pa.float16())
    elif fmt == "topk":
        vals, idx = logits.topk(min(k, classes), dim=1)
        small = classes <= INT16_CLASSES
        index_type = (np.int16, pa.int16()) if small else (np.int32, pa.int32())
        cols["topk_indices"] = _fixed(idx.numpy().astype(index_type[0]), index_type[1])
        cols["topk_values"] = _fixed(vals.half().numpy(), pa.float16())
        # The mean of the other logits: what the classes outside the top k are read back as,
        # so a softened (high-temperature) target keeps its tail mass instead of none.
        rest = classes - vals.shape[1]
        tail = (logits.sum(1) - vals.sum(1)) / max(1, rest)
        cols["topk_rest"] = pa.array(tail.half().numpy())
    else:
        raise ValueError(f"unknown label format {fmt!r}; expected 'fp32', 'fp16' or 'topk'")
    meta = {
        b"d3s_labels_schema": str(LABELS_SCHEMA_VERSION).encode(),
        b"d3s_label_format": fmt.encode(),
        b"d3s_classes": str(classes).encode(),
    }
    return pa.table(cols).replace_schema_metadata(meta)


ROW_GROUP_BYTES = 32 * 2**20  # label payload per Parquet row group (whole batches)


def _row_bytes(fmt: LabelFormat, classes: int, k: int) -> int:
    """Uncompressed bytes of one row's label columns (for sizing row groups)."""
    fixed = 4 * 4 + 4 * 2 + 1  # epoch, batch, position, image_index; boxes; flip
    if fmt == "fp32":
        return fixed + 4 * classes
    if fmt == "fp16":
        return fixed + 2 * classes
    return fixed + min(k, classes) * (2 + 2) + 2


def write_epoch_batches(
    fs: RunFS, rel: str, batches: Iterable[EpochLabels], fmt: LabelFormat, k: int = 10
) -> int:
    """Write an epoch as it is labelled, in Parquet row groups of whole label batches of about
    ROW_GROUP_BYTES of labels each (a row group per batch would cost 2-4 KB of footer and page
    overhead per batch: twice the bytes of a top-k file). Only the batches of the row group
    being filled are held, as compact Arrow columns (top-k: k values a row, not the dense
    logits). Written to a temporary file and published whole on success
    (`RunFS.atomic_local_path`); a failure leaves nothing under `rel`. Returns the number of
    row groups."""
    groups = 0
    pending: list[pa.Table] = []
    rows = 0
    with fs.atomic_local_path(rel) as tmp:
        writer: pq.ParquetWriter | None = None

        def flush() -> None:
            nonlocal writer, groups, rows
            if not pending:
                return
            table = pa.concat_tables(pending)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema, **WRITE_OPTIONS)
            writer.write_table(table, row_group_size=max(1, len(table)))
            groups += 1
            pending.clear()
            rows = 0

        try:
            for lab in batches:
                table = epoch_table(lab, fmt, k)
                pending.append(table)
                rows += len(table)
                if rows * _row_bytes(fmt, lab.logits.shape[1], k) >= ROW_GROUP_BYTES:
                    flush()
            flush()
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            raise ValueError(f"{fs.url(rel)}: no label batches to write")
    return groups


def write_epoch(fs: RunFS, rel: str, lab: EpochLabels, fmt: LabelFormat, k: int = 10) -> None:
    """Write a labelled epoch held whole: one row group per run of rows of one batch (per
    batch, for an epoch in batch order), rows in their order, as `write_epoch_batches`."""
    b = lab.batch
    starts = [0, *(torch.nonzero(b[1:] != b[:-1]).flatten() + 1).tolist(), len(b)]
    write_epoch_batches(
        fs, rel, (lab.select(slice(i, j)) for i, j in itertools.pairwise(starts)), fmt, k
    )


def write_schema(fs: RunFS, fmt: LabelFormat, classes: int, k: int, prefix: str = "") -> None:
    doc = {
        "schema_version": LABELS_SCHEMA_VERSION,
        "format": fmt,
        "classes": classes,
        "topk": k if fmt == "topk" else None,
        "partitioning": "hive (epoch=N)",
    }
    fs.write_bytes(f"{prefix}labels/_schema.json", json.dumps(doc, indent=1).encode())


def _schema_version(meta: dict[bytes, bytes]) -> int:
    return int(meta.get(b"d3s_labels_schema", b"1"))  # v1 files may predate the key


def epoch_schema_version(fs: RunFS, rel: str) -> int:
    """The label schema version an epoch file was written with (its footer only)."""
    try:
        meta = pq.read_schema(fs.path(rel), filesystem=fs.fs).metadata or {}
    except (pa.ArrowInvalid, OSError) as e:
        raise CorruptArtifact(f"{fs.url(rel)}: unreadable Parquet file ({e})") from e
    return _schema_version(meta)


def _corrupt(fs: RunFS, rel: str, e: Exception) -> CorruptArtifact:
    return CorruptArtifact(f"{fs.url(rel)}: unreadable Parquet file ({e})")


def read_epoch(fs: RunFS, rel: str, epoch: int) -> EpochLabels:
    """Read one epoch back whole (schema version 1 or 2); top-k labels become dense logits whose
    classes outside the top k all hold `topk_rest`, the mean of those logits (files without
    that column: -inf, all mass on the stored classes). Boxes: float32, for version 2 q / 65535.
    Rows in file order. The stages stream instead: `read_epoch_batches`."""
    try:
        table = pq.read_table(fs.path(rel), filesystem=fs.fs)
    except (pa.ArrowInvalid, OSError) as e:
        raise _corrupt(fs, rel, e) from e
    return _epoch_labels(table, table.schema.metadata or {}, epoch, fs.url(rel))


def _open(fs: RunFS, rel: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(fs.path(rel), filesystem=fs.fs)
    except (pa.ArrowInvalid, OSError) as e:
        raise _corrupt(fs, rel, e) from e


def _streams_by_row_group(pf: pq.ParquetFile) -> bool:
    """True when every row group holds whole label batches, in increasing batch order across
    row groups (files from `write_epoch_batches`: one batch each; older files: one row group,
    all batches). Decided from the footer's min/max of `batch` where present."""
    md = pf.metadata
    col = next(i for i in range(md.num_columns) if md.schema.column(i).path == "batch")
    last = -1
    for r in range(md.num_row_groups):
        stats = md.row_group(r).column(col).statistics
        if stats is not None and stats.has_min_max:
            lo, hi = int(stats.min), int(stats.max)
        else:
            values = pf.read_row_group(r, columns=["batch"]).column(0).to_numpy()
            if not len(values):
                continue
            lo, hi = int(values.min()), int(values.max())
        if lo <= last:
            return False
        last = hi
    return True


def read_epoch_batches(fs: RunFS, rel: str, epoch: int) -> Iterator[EpochLabels]:
    """One EpochLabels per label batch, in batch order, rows in position order, as
    `read_epoch` would give them (`EpochLabels.batches`): one row group (whole batches, about
    ROW_GROUP_BYTES of labels) is read at a time and only one batch's logits are made dense.
    A file whose row groups cut batches is read whole (its compact columns) and split."""
    pf = _open(fs, rel)
    try:
        meta = pf.schema_arrow.metadata or {}
        try:
            tables: Iterable[pa.Table] = (
                (pf.read_row_group(r) for r in range(pf.metadata.num_row_groups))
                if _streams_by_row_group(pf)
                else [pf.read()]
            )
            for table in tables:
                # Split into batches on the compact columns, then make each batch's dense
                # logits: a row group of top-k labels never becomes dense as a whole.
                batch, position = (
                    torch.from_numpy(table.column(c).to_numpy().astype(np.int64))
                    for c in ("batch", "position")
                )
                for rows in batch_rows(batch, position):
                    part = table.take(pa.array(rows.numpy()))
                    yield _epoch_labels(part, meta, epoch, fs.url(rel))
        except (pa.ArrowInvalid, OSError) as e:
            raise _corrupt(fs, rel, e) from e
    finally:
        pf.close()


def epoch_image_batches(fs: RunFS, rel: str) -> list[torch.Tensor]:
    """(B,) int64 image indices of each label batch of an epoch file, in the order and row
    order `read_epoch_batches` yields them: the rows an image reader fetches for each batch.
    Reads three int32 columns only (12 bytes a row: 1.3 MB at 104,500 rows)."""
    pf = _open(fs, rel)
    try:
        t = pf.read(columns=["batch", "position", "image_index"])
    except (pa.ArrowInvalid, OSError) as e:
        raise _corrupt(fs, rel, e) from e
    finally:
        pf.close()
    batch, position, index = (
        torch.from_numpy(t.column(c).to_numpy().astype(np.int64)) for c in t.column_names
    )
    return [index[rows] for rows in batch_rows(batch, position)]


def _epoch_labels(table: pa.Table, meta: dict[bytes, bytes], epoch: int, where: str) -> EpochLabels:
    """The rows of `table` (a whole epoch file or some of its row groups) as EpochLabels."""
    version = _schema_version(meta)
    if version > LABELS_SCHEMA_VERSION:
        raise ValueError(
            f"{where}: label schema version {version}, newer than this code's "
            f"{LABELS_SCHEMA_VERSION}"
        )
    fmt = meta.get(b"d3s_label_format", b"").decode()
    classes = int(meta.get(b"d3s_classes", b"0"))
    if fmt in ("fp32", "fp16"):
        flat = table.column("logits").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        logits = torch.from_numpy(flat.astype(np.float32).reshape(len(table), classes))
    elif fmt == "topk":
        idx = table.column("topk_indices").combine_chunks().flatten().to_numpy()
        val = table.column("topk_values").combine_chunks().flatten().to_numpy()
        k = len(idx) // max(1, len(table))
        logits = torch.full((len(table), classes), float("-inf"))
        if "topk_rest" in table.column_names:
            rest = torch.from_numpy(table.column("topk_rest").to_numpy().astype(np.float32))
            logits = rest[:, None].expand(-1, classes).clone()
        logits.scatter_(
            1,
            torch.from_numpy(idx.reshape(-1, k).astype(np.int64)),
            torch.from_numpy(val.reshape(-1, k).astype(np.float32)),
        )
    else:
        raise CorruptArtifact(f"{where}: unknown label format {fmt!r} in metadata")

    def col(name: str) -> torch.Tensor:
        return torch.from_numpy(table.column(name).to_numpy().copy())

    stored = np.stack([table.column(c).to_numpy() for c in BOX_COLUMNS], 1)
    if stored.dtype == np.uint16:  # version 2: codes q, the box is q / 65535
        boxes = boxes_from_codes(torch.from_numpy(stored.astype(np.int32)))
    else:  # version 1: float32 boxes
        boxes = torch.from_numpy(stored.astype(np.float32))
    return EpochLabels(
        epoch,
        col("batch").long(),
        col("position").long(),
        col("image_index").long(),
        boxes,
        col("flip").bool(),
        logits,
    )
