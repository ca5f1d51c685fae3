"""Bytes of soft labels on disk: ours (Parquet, storage/labels.py) and FKD's (SRe2L's relabel).

Ours is measured, not estimated: one epoch of random logits is written by the same
`write_epoch` the pipeline uses (schema v2, zstd), and the file's size is multiplied by the
number of epochs. Random logits compress little (zstd finds ~7-8% in their exponent bits), so
this is close to an upper bound for real logits.

FKD's reference is measured the same way, by `torch.save` of the list that SRe2L's
`relabel/generate_soft_label.py` (`save()`) writes per batch, `epoch_{e}/batch_{i}.tar`:
[coords (B, 4) float32, flip_status (B,) bool, mix_index (B,) int64, mix_lam (numpy float64),
mix_bbox (4 numpy int64), soft_label (B, C) float16] (with `--use-fp16 --mix-type cutmix`, the
settings of its relabel.sh, batch 1024). Per epoch that is ceil(N / B) files of
B * (2C + 16 + 1 + 8) payload bytes plus the zip/pickle overhead of each file.
"""

from __future__ import annotations

import io
import os
import tempfile

import numpy as np
import torch

from d3s_core.augment import draw_crops
from d3s_core.labelling import EpochLabels, epoch_batches

from .fs import RunFS
from .labels import LabelFormat, write_epoch, write_schema

FKD_BATCH = 1024  # SRe2L relabel.sh `-b 1024`; train_FKD.py needs the same --batch-size


def random_epoch(n: int, classes: int, batch_size: int = 128, seed: int = 0) -> EpochLabels:
    """An epoch of n rows shaped like the pipeline's: seeded batches, drawn crops and flips,
    logits N(0, 2^2) float32 (n, classes)."""
    g = torch.Generator().manual_seed(seed)
    batches = epoch_batches(n, batch_size, seed, 0)
    boxes, flips = draw_crops(n, g)
    return EpochLabels(
        0,
        torch.cat([torch.full((len(b),), i) for i, b in enumerate(batches)]),
        torch.cat([torch.arange(len(b)) for b in batches]),
        torch.cat(batches),
        boxes,
        flips,
        2.0 * torch.randn(n, classes, generator=g),
    )


def parquet_epoch_bytes(n: int, classes: int, fmt: LabelFormat, k: int = 10) -> int:
    """Size in bytes of one epoch of n rows as `write_epoch` writes it (random logits)."""
    with tempfile.TemporaryDirectory() as d:
        fs = RunFS(d)
        write_epoch(fs, "epoch=0/part-0.parquet", random_epoch(n, classes), fmt, k)
        return os.path.getsize(fs.path("epoch=0/part-0.parquet"))


def epoch_bytes(n: int, classes: int, fmt: LabelFormat, k: int = 10, max_rows: int = 50_000) -> int:
    """Bytes of one epoch of n rows, written whole up to `max_rows` rows. Above, a line through
    two measured sizes (max_rows / 2 and max_rows rows) is extrapolated to n. That is only
    approximate: the dictionaries of the repeating columns (batch, position, top-k indices) and
    zstd do not grow linearly in n (bench/label_storage.py measures the error from 5,000 and
    10,000 rows to 50,000: under 1% with schema v2, up to ~10% for top-k with v1's writer)."""
    if n <= max_rows:
        return parquet_epoch_bytes(n, classes, fmt, k)
    lo, hi = max_rows // 2, max_rows
    b_lo = parquet_epoch_bytes(lo, classes, fmt, k)
    b_hi = parquet_epoch_bytes(hi, classes, fmt, k)
    return round(b_hi + (b_hi - b_lo) / (hi - lo) * (n - hi))


def schema_bytes(fmt: LabelFormat, classes: int, k: int = 10) -> int:
    """Size of `labels/_schema.json`."""
    with tempfile.TemporaryDirectory() as d:
        fs = RunFS(d)
        write_schema(fs, fmt, classes, k)
        return len(fs.read_bytes("labels/_schema.json"))


def labels_bytes(
    n: int, classes: int, epochs: int, fmt: LabelFormat, k: int = 10, max_rows: int = 50_000
) -> int:
    """Bytes of our `labels/` directory: `epochs` Parquet files of n rows and `_schema.json`."""
    return epochs * epoch_bytes(n, classes, fmt, k, max_rows) + schema_bytes(fmt, classes, k)


# -- FKD (SRe2L relabel) ---------------------------------------------------------------------
def fkd_batch_file_bytes(b: int, classes: int, fp16: bool = True, mix: bool = True) -> int:
    """Size of one `batch_{i}.tar` as SRe2L's generate_soft_label.py `save()` writes it:
    torch.save([coords, flip_status, mix_index, mix_lam, mix_bbox, soft_label])."""
    g = torch.Generator().manual_seed(0)
    coords = torch.rand(b, 4, generator=g)  # per image (i/H, j/W, h/H, w/W), float32
    flips = torch.rand(b, generator=g) < 0.5  # collated Python bools: torch.bool
    soft = torch.randn(b, classes, generator=g)
    record = [
        coords,
        flips,
        torch.randperm(b, generator=g) if mix else None,  # CutMix partner of each image
        np.float64(0.37) if mix else None,  # np.random.beta(...)
        [np.int64(v) for v in (10, 20, 150, 170)] if mix else None,  # np.clip(...) box
        soft.half() if fp16 else soft,
    ]
    buf = io.BytesIO()
    torch.save(record, buf)
    return len(buf.getvalue())


def fkd_epoch_bytes(n: int, classes: int, batch_size: int = FKD_BATCH, fp16: bool = True) -> int:
    """Bytes of one FKD epoch directory: ceil(n / batch_size) batch files."""
    full, last = divmod(n, batch_size)
    size = full * fkd_batch_file_bytes(batch_size, classes, fp16)
    return size + (fkd_batch_file_bytes(last, classes, fp16) if last else 0)


def fkd_bytes(n: int, classes: int, epochs: int, batch_size: int = FKD_BATCH) -> int:
    """Bytes of an FKD label directory (fp16, CutMix records), measured per batch file."""
    return epochs * fkd_epoch_bytes(n, classes, batch_size)


def fkd_dense_fp16_bytes(n: int, classes: int, epochs: int) -> int:
    """The soft labels alone, N x C x 2 bytes per epoch (no augmentation record, no file
    overhead): the smallest FKD-style fp16 dense labels can be."""
    return n * classes * 2 * epochs
