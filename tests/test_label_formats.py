"""Label formats read back: dense exactly (fp32) or to fp16; top-k (fp16 values) with the other
classes at the mean of their logits (older files without that column: -inf). Schema v2 stores
boxes as uint16 codes that read back bit-equal to `quantise_boxes`; v1 files still read."""

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from d3s_core.augment import box_codes, quantise_boxes
from storage.fs import RunFS
from storage.labels import BOX_COLUMNS, LABELS_SCHEMA_VERSION, read_epoch, write_epoch

from .helpers import epoch, v1_table


def assert_rows_equal(back, lab):
    for name in ("batch", "position", "image_index", "flips"):
        assert torch.equal(getattr(back, name), getattr(lab, name).to(getattr(back, name).dtype))
    assert back.boxes.dtype == torch.float32 and torch.equal(back.boxes, lab.boxes)


def test_formats_read_back(tmp_path):
    fs, lab = RunFS(tmp_path), epoch()
    for fmt in ("fp32", "fp16"):
        write_epoch(fs, f"{fmt}.parquet", lab, fmt)
        back = read_epoch(fs, f"{fmt}.parquet", 0)
        want = lab.logits if fmt == "fp32" else lab.logits.half().float()
        assert torch.equal(back.logits, want)
        assert_rows_equal(back, lab)
    write_epoch(fs, "top3.parquet", lab, "topk", 3)
    back = read_epoch(fs, "top3.parquet", 0)
    assert_rows_equal(back, lab)
    vals, idx = lab.logits.topk(3, dim=1)
    assert torch.equal(back.logits.gather(1, idx), vals.half().float())
    rest = torch.ones_like(lab.logits, dtype=torch.bool).scatter_(1, idx, False)
    tail = (lab.logits * rest).sum(1) / 7
    got_tail = back.logits[rest].view(-1, 7)
    assert torch.equal(got_tail, tail.half().float()[:, None].expand(-1, 7))
    # A file written before the tail column existed: all mass on the stored classes.
    table = pq.read_table(tmp_path / "top3.parquet")
    pq.write_table(table.drop(["topk_rest"]), tmp_path / "old.parquet")
    old = read_epoch(fs, "old.parquet", 0).logits
    assert torch.isneginf(old[rest]).all() and torch.equal(old.gather(1, idx), vals.half().float())


def test_boxes_off_the_grid_read_back_quantised(tmp_path):
    """Any box is stored as its nearest grid box, bit-equal to quantise_boxes (within 1/131070)."""
    fs, lab = RunFS(tmp_path), epoch(on_grid=False)
    write_epoch(fs, "e.parquet", lab, "fp16")
    back = read_epoch(fs, "e.parquet", 0).boxes
    assert torch.equal(back, quantise_boxes(lab.boxes))
    assert (back - lab.boxes).abs().max() <= 0.5 / 65535 + 1e-7


def test_quantise_boxes_is_exact_on_the_grid():
    codes = torch.arange(65536, dtype=torch.int32).view(-1, 4)
    grid = codes.float() / 65535
    assert torch.equal(box_codes(grid), codes) and torch.equal(quantise_boxes(grid), grid)
    # clamped into [0, 1], then the nearest code
    edge = torch.tensor([[-0.1, 1.5, 0.4 / 65535, 0.6 / 65535]])
    assert box_codes(edge).tolist() == [[0, 65535, 0, 1]]


V2_TYPES = {
    "epoch": pa.int32(),
    "batch": pa.int32(),
    "position": pa.int32(),
    "image_index": pa.int32(),
    **{c: pa.uint16() for c in BOX_COLUMNS},
    "flip": pa.bool_(),
}


@pytest.mark.parametrize(
    "fmt, classes, label_types",
    [
        ("fp32", 10, {"logits": pa.list_(pa.float32(), 10)}),
        ("fp16", 10, {"logits": pa.list_(pa.float16(), 10)}),
        (
            "topk",
            10,
            {
                "topk_indices": pa.list_(pa.int16(), 3),
                "topk_values": pa.list_(pa.float16(), 3),
                "topk_rest": pa.float16(),
            },
        ),
        (
            "topk",
            40_000,  # more classes than int16 holds: int32 indices
            {
                "topk_indices": pa.list_(pa.int32(), 3),
                "topk_values": pa.list_(pa.float16(), 3),
                "topk_rest": pa.float16(),
            },
        ),
    ],
)
def test_v2_column_types(tmp_path, fmt, classes, label_types):
    fs, lab = RunFS(tmp_path), epoch(n=6, classes=classes)
    if classes > 32767:  # the top classes must need more than int16
        lab.logits[:, -3:] += 100
    write_epoch(fs, "e.parquet", lab, fmt, 3)
    schema = pq.read_schema(tmp_path / "e.parquet")
    assert {f.name: f.type for f in schema} == {**V2_TYPES, **label_types}
    assert schema.metadata[b"d3s_labels_schema"] == str(LABELS_SCHEMA_VERSION).encode() == b"2"
    back = read_epoch(fs, "e.parquet", 0)
    assert_rows_equal(back, lab)
    if fmt == "topk":
        vals, idx = lab.logits.topk(3, dim=1)
        assert torch.equal(back.logits.gather(1, idx), vals.half().float())


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "topk"])
def test_v1_files_still_read(tmp_path, fmt):
    fs, lab = RunFS(tmp_path), epoch(on_grid=False)  # v1 boxes: any float32
    pq.write_table(v1_table(lab, fmt), tmp_path / "v1.parquet")
    assert pq.read_schema(tmp_path / "v1.parquet").field("crop_x0").type == pa.float32()
    back = read_epoch(fs, "v1.parquet", 0)
    assert_rows_equal(back, lab)  # boxes exactly the float32 ones stored
    if fmt == "fp32":
        assert torch.equal(back.logits, lab.logits)
    elif fmt == "fp16":
        assert torch.equal(back.logits, lab.logits.half().float())
    else:
        vals, idx = lab.logits.topk(3, dim=1)
        assert torch.equal(back.logits.gather(1, idx), vals)


def test_image_index_beyond_int32_is_refused(tmp_path):
    lab = epoch()
    lab.image_index = lab.image_index.clone()
    lab.image_index[3] = 2**31
    with pytest.raises(ValueError, match="image_index 2147483648"):
        write_epoch(RunFS(tmp_path), "e.parquet", lab, "fp16")
    assert not (tmp_path / "e.parquet").exists()
    lab.image_index[3] = 2**31 - 1  # the largest that fits
    write_epoch(RunFS(tmp_path), "e.parquet", lab, "fp16")
    assert int(read_epoch(RunFS(tmp_path), "e.parquet", 0).image_index[3]) == 2**31 - 1


@pytest.mark.parametrize("fmt", ["fp16", "topk"])
def test_duckdb_and_pandas_read_v2_files(tmp_path, fmt):
    """Independent readers see the same rows as read_epoch: boxes as codes q (= box * 65535),
    logits as the stored float16 values."""
    fs, lab = RunFS(tmp_path), epoch()
    write_epoch(fs, "e.parquet", lab, fmt, 3)
    back = read_epoch(fs, "e.parquet", 0)
    path = str(tmp_path / "e.parquet")
    rows = duckdb.sql(f"SELECT * FROM read_parquet('{path}')").fetchnumpy()
    for name in ("batch", "position", "image_index"):
        assert np.array_equal(rows[name], getattr(back, name).numpy())
    assert np.array_equal(rows["flip"], back.flips.numpy())
    codes = np.stack([rows[c] for c in BOX_COLUMNS], 1)
    assert codes.dtype == np.uint16 and np.array_equal(codes, box_codes(back.boxes).numpy())
    assert np.array_equal(codes.astype(np.float32) / np.float32(65535), back.boxes.numpy())
    if fmt == "fp16":
        dense = np.stack(rows["logits"])
        assert np.array_equal(dense, back.logits.numpy())
    else:
        idx = torch.from_numpy(np.stack(rows["topk_indices"]).astype(np.int64))
        vals = np.stack(rows["topk_values"])
        assert np.array_equal(vals, back.logits.gather(1, idx).numpy())
        # the rest (mean of the other logits) is below every top-k value: each row's minimum
        assert np.array_equal(rows["topk_rest"], back.logits.min(1).values.numpy())
    df = pd.read_parquet(path)
    assert np.array_equal(df[list(BOX_COLUMNS)].to_numpy(), codes)
    assert np.array_equal(df["image_index"].to_numpy(), back.image_index.numpy())
