"""Soft labels: a Parquet dataset partitioned by epoch, `labels/epoch=N/part-0.parquet`.

Columns (named, never positional): epoch int32, batch int32, position int32, image_index int64,
crop_x0/crop_y0/crop_x1/crop_y1 float32 (normalised box), flip bool, and either
`logits` fixed_size_list<float32|float16>[classes] (dense) or `topk_indices`
fixed_size_list<int32>[k] + `topk_values` fixed_size_list<float32>[k] (top-k of the ensemble
logits) + `topk_rest` float32 (the mean of the other logits, what they are read back as).
The schema version and label format are in each file's metadata and in `labels/_schema.json`.
Each file is written to a temporary name and renamed (or uploaded whole), so a killed write
never leaves a footer-less file under the real name.
"""

from __future__ import annotations

import json
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from d3s_core.labelling import EpochLabels

from .fs import RunFS
from .manifest import CorruptArtifact

LABELS_SCHEMA_VERSION = 1
LabelFormat = Literal["fp32", "fp16", "topk"]


def _fixed(values: np.ndarray, pa_type: pa.DataType) -> pa.FixedSizeListArray:
    n, k = values.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=pa_type), k)


def epoch_table(lab: EpochLabels, fmt: LabelFormat, k: int = 10) -> pa.Table:
    boxes = lab.boxes.numpy().astype(np.float32)
    cols: dict[str, pa.Array] = {
        "epoch": pa.array(np.full(len(lab.batch), lab.epoch, np.int32)),
        "batch": pa.array(lab.batch.numpy().astype(np.int32)),
        "position": pa.array(lab.position.numpy().astype(np.int32)),
        "image_index": pa.array(lab.image_index.numpy().astype(np.int64)),
        "crop_x0": pa.array(boxes[:, 0]),
        "crop_y0": pa.array(boxes[:, 1]),
        "crop_x1": pa.array(boxes[:, 2]),
        "crop_y1": pa.array(boxes[:, 3]),
        "flip": pa.array(lab.flips.numpy().astype(bool)),
    }
    logits = lab.logits.float()
    if fmt == "fp32":
        cols["logits"] = _fixed(logits.numpy(), pa.float32())
    elif fmt == "fp16":
        cols["logits"] = _fixed(logits.half().numpy(), pa.float16())
    elif fmt == "topk":
        vals, idx = logits.topk(min(k, logits.shape[1]), dim=1)
        cols["topk_indices"] = _fixed(idx.numpy().astype(np.int32), pa.int32())
        cols["topk_values"] = _fixed(vals.numpy(), pa.float32())
        # The mean of the other logits: what the classes outside the top k are read back as,
        # so a softened (high-temperature) target keeps its tail mass instead of none.
        rest = logits.shape[1] - vals.shape[1]
        tail = (logits.sum(1) - vals.sum(1)) / max(1, rest)
        cols["topk_rest"] = pa.array(tail.numpy().astype(np.float32))
    else:
        raise ValueError(f"unknown label format {fmt!r}; expected 'fp32', 'fp16' or 'topk'")
    meta = {
        b"d3s_labels_schema": str(LABELS_SCHEMA_VERSION).encode(),
        b"d3s_label_format": fmt.encode(),
        b"d3s_classes": str(logits.shape[1]).encode(),
    }
    return pa.table(cols).replace_schema_metadata(meta)


def write_epoch(fs: RunFS, rel: str, lab: EpochLabels, fmt: LabelFormat, k: int = 10) -> None:
    table = epoch_table(lab, fmt, k)
    with fs.atomic_local_path(rel) as tmp:
        pq.write_table(table, tmp)


def write_schema(fs: RunFS, fmt: LabelFormat, classes: int, k: int, prefix: str = "") -> None:
    doc = {
        "schema_version": LABELS_SCHEMA_VERSION,
        "format": fmt,
        "classes": classes,
        "topk": k if fmt == "topk" else None,
        "partitioning": "hive (epoch=N)",
    }
    fs.write_bytes(f"{prefix}labels/_schema.json", json.dumps(doc, indent=1).encode())


def read_epoch(fs: RunFS, rel: str, epoch: int) -> EpochLabels:
    """Read one epoch back; top-k labels become dense logits whose classes outside the top k
    all hold `topk_rest`, the mean of those logits (files without that column: -inf, all mass
    on the stored classes)."""
    try:
        table = pq.read_table(fs.path(rel), filesystem=fs.fs)
    except (pa.ArrowInvalid, OSError) as e:
        raise CorruptArtifact(f"{fs.url(rel)}: unreadable Parquet file ({e})") from e
    meta = table.schema.metadata or {}
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
        raise CorruptArtifact(f"{fs.url(rel)}: unknown label format {fmt!r} in metadata")

    def col(name: str) -> torch.Tensor:
        return torch.from_numpy(table.column(name).to_numpy().copy())

    boxes = torch.stack([col(c) for c in ("crop_x0", "crop_y0", "crop_x1", "crop_y1")], 1)
    return EpochLabels(
        epoch,
        col("batch").long(),
        col("position").long(),
        col("image_index").long(),
        boxes.float(),
        col("flip").bool(),
        logits,
    )
