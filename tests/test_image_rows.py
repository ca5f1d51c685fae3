"""Random rows of images.zarr: the direct shard reader (`_RawShards`) gives exactly what Zarr's
own reader gives, unwritten rows included, in any order, with repeats; a store in another
layout is read through Zarr."""

import numpy as np
import torch
import zarr

from storage.arrays import ImageRows, create_images, row_batches, write_image_batch
from storage.fs import RunFS


def test_raw_shard_rows_equal_zarrs(tmp_path):
    fs = RunFS(tmp_path)
    x = torch.randn(230, 3, 8, 8)
    create_images(fs, "images.zarr", 230, (3, 8, 8), 20, torch.arange(230) % 7, {})
    for start in range(0, 200, 20):  # rows 200..229 never written (a stage still running)
        write_image_batch(fs, "images.zarr", start, x[start : start + 20])
    rows = ImageRows(fs, "images.zarr")
    rows._images()
    assert rows._raw is not None  # the fast path is the one tested
    idx = torch.randperm(230, generator=torch.Generator().manual_seed(0)).tolist() + [3, 3, 229]
    got = rows.__getitems__(idx)
    # Zarr's own reader, independent of ours.
    ref = np.asarray(zarr.open_group(str(tmp_path / "images.zarr"), mode="r")["images"][:])[idx]
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), ref)  # NaN (the fill value) equals NaN here
    assert torch.isnan(got[-1]).all() and torch.equal(got[-2], x[3])
    batches = list(row_batches(fs, "images.zarr", [[5, 1], [199, 0, 0]], "cpu", 2))
    assert torch.equal(batches[1], x[[199, 0, 0]])


def test_other_layouts_read_through_zarr(tmp_path):
    g = zarr.open_group(str(tmp_path / "old.zarr"), mode="w")
    x = np.random.default_rng(0).standard_normal((30, 1, 4, 4)).astype(np.float32)
    g.create_array("images", shape=x.shape, chunks=(10, 1, 4, 4), dtype="float32")[:] = x
    g.create_array("classes", shape=(30,), dtype="int64")[:] = np.arange(30)
    rows = ImageRows(RunFS(tmp_path), "old.zarr")
    got = rows.__getitems__([29, 0, 14])
    assert rows._raw is None
    np.testing.assert_array_equal(got.numpy(), x[[29, 0, 14]])
