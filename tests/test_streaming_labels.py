"""Streaming labels and students (#12): an epoch labelled, written, read and trained on one
label batch at a time, the images of each batch read from the Zarr store, equals the
whole-set, whole-epoch path bit for bit (CPU, float32, same thread count)."""

import copy

import pyarrow.parquet as pq
import pytest
import torch

import storage.labels
from d3s_core.labelling import EpochLabels, epoch_batches, label_batches, label_epoch
from d3s_core.students import train_student_batches, train_student_epoch
from storage.arrays import create_images, row_batches, write_image_batch
from storage.config import parse_config
from storage.fs import RunFS
from storage.labels import (
    WRITE_OPTIONS,
    epoch_image_batches,
    epoch_table,
    read_epoch,
    read_epoch_batches,
    write_epoch_batches,
)
from storage.run import images_of, labels_epoch, open_run
from tasks.stages import open_data
from tasks.stages.labels import write_one_epoch
from tasks.stages.validation import _student_epoch

from .configs import SMALL
from .helpers import tiny_teacher

N, SIZE, BATCH = 23, 12, 5  # 5 label batches, the last one short


@pytest.fixture(autouse=True)
def one_thread():
    """Both paths run with the same thread count anyway; one keeps tiny models fast on a
    shared machine (two threads spin against other processes' load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def teachers(n=2, in_chans=3):
    return [tiny_teacher(in_chans=in_chans, seed=s).eval() for s in range(n)]


def image_store(fs, rel="images.zarr", n=N, chans=3, size=SIZE, synthesis_batch=10):
    """A store shaped like synthesis writes it (one shard per synthesis batch); returns the
    images held whole, for the in-memory path."""
    images = torch.randn(n, chans, size, size, generator=torch.Generator().manual_seed(1))
    create_images(fs, rel, n, (chans, size, size), synthesis_batch, torch.arange(n) % 4, {})
    for start in range(0, n, synthesis_batch):
        write_image_batch(fs, rel, start, images[start : start + synthesis_batch])
    return images


def streamed_labels(fs, rel, ts, epoch, fmt="fp32", k=10):
    """Labels of `epoch` through the streaming path: rows from the store, one row group each."""
    lists = [b.tolist() for b in epoch_batches(N, BATCH, 7, epoch)]
    rows = row_batches(fs, "images.zarr", lists, "cpu", 0)
    return write_epoch_batches(fs, rel, label_batches(N, rows, ts, epoch, 7, BATCH), fmt, k)


def old_write(fs, rel, lab, fmt, k=10):
    """What `write_epoch` wrote before #12: the whole table, one row group."""
    with fs.atomic_local_path(rel) as tmp:
        pq.write_table(epoch_table(lab, fmt, k), tmp, **WRITE_OPTIONS)


def assert_labels_equal(a: EpochLabels, b: EpochLabels):
    assert a.epoch == b.epoch
    for f in ("batch", "position", "image_index", "boxes", "flips", "logits"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and torch.equal(x, y), f


def test_label_batches_are_label_epoch_batch_by_batch():
    ts, images = teachers(), torch.randn(N, 3, SIZE, SIZE)
    whole = label_epoch(images, ts, epoch=3, seed=7, batch_size=BATCH)
    rows = (images[idx] for idx in epoch_batches(N, BATCH, 7, 3))
    parts = list(label_batches(N, rows, ts, 3, 7, BATCH))
    assert [len(p) for p in parts] == [5, 5, 5, 5, 3]
    assert all(int(p.batch.unique()) == b for b, p in enumerate(parts))
    assert_labels_equal(EpochLabels.cat(parts), whole)
    # One image batch too few (or a batch of the wrong size) is an error, not a shorter epoch.
    with pytest.raises(ValueError):
        list(
            label_batches(
                N, (images[idx] for idx in epoch_batches(N, BATCH, 7, 3)[:-1]), ts, 3, 7, BATCH
            )
        )
    with pytest.raises(ValueError, match="eval mode"):
        label_batches(N, [], [tiny_teacher().train()], 3, 7, BATCH)


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "topk"])
def test_streamed_epoch_file_equals_the_in_memory_path(tmp_path, fmt, monkeypatch):
    fs, ts = RunFS(tmp_path), teachers()
    images = image_store(fs)
    assert streamed_labels(fs, "whole.parquet", ts, 2, fmt, 3) == 1  # a small epoch: one group
    monkeypatch.setattr(storage.labels, "ROW_GROUP_BYTES", 1)  # a row group per label batch
    assert streamed_labels(fs, "new.parquet", ts, 2, fmt, 3) == 5
    old_write(fs, "old.parquet", label_epoch(images, ts, 2, 7, BATCH), fmt, 3)
    new, old = read_epoch(fs, "new.parquet", 2), read_epoch(fs, "old.parquet", 2)
    assert_labels_equal(new, old)
    # One row group per label batch, each one batch in position order; plain pyarrow reads it
    # as the same table the whole-table writer wrote.
    pf = pq.ParquetFile(tmp_path / "new.parquet")
    assert pf.metadata.num_row_groups == 5
    for b in range(5):
        group = pf.read_row_group(b, columns=["batch", "position"]).to_pydict()
        assert set(group["batch"]) == {b} and group["position"] == list(range(len(group["batch"])))
    plain, before = pq.read_table(tmp_path / "new.parquet"), pq.read_table(tmp_path / "old.parquet")
    assert plain.equals(before) and plain.schema.metadata == before.schema.metadata
    assert pq.read_table(tmp_path / "whole.parquet").equals(before)
    # Streamed back: one EpochLabels per batch, together the file; the image lists match them.
    parts = list(read_epoch_batches(fs, "new.parquet", 2))
    assert [len(p) for p in parts] == [5, 5, 5, 5, 3]
    assert_labels_equal(EpochLabels.cat(parts), old)
    lists = epoch_image_batches(fs, "new.parquet")
    assert all(torch.equal(i, p.image_index) for i, p in zip(lists, parts, strict=True))
    assert all(torch.equal(i, e) for i, e in zip(lists, epoch_batches(N, BATCH, 7, 2), strict=True))


def test_row_groups_hold_whole_batches_up_to_the_byte_budget(tmp_path, monkeypatch):
    fs, ts = RunFS(tmp_path), teachers()
    image_store(fs)
    row = storage.labels._row_bytes("fp32", 4, 10)
    monkeypatch.setattr(storage.labels, "ROW_GROUP_BYTES", 2 * BATCH * row)  # two batches
    assert streamed_labels(fs, "e.parquet", ts, 0, "fp32") == 3  # batches 0-1, 2-3, 4
    pf = pq.ParquetFile(tmp_path / "e.parquet")
    seen = [
        sorted(set(pf.read_row_group(g, columns=["batch"]).column(0).to_pylist())) for g in range(3)
    ]
    assert seen == [[0, 1], [2, 3], [4]]
    assert [len(p) for p in read_epoch_batches(fs, "e.parquet", 0)] == [5, 5, 5, 5, 3]


def test_one_batch_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setattr(storage.labels, "ROW_GROUP_BYTES", 1)
    """Labelling pulls one image batch per label batch; reading a file written per batch reads
    one row group per label batch, when it is asked for, and never the whole file."""
    fs, ts, images = RunFS(tmp_path), teachers(), torch.randn(N, 3, SIZE, SIZE)
    pulled = []

    def rows():
        for b, idx in enumerate(epoch_batches(N, BATCH, 7, 0)):
            pulled.append(b)
            yield images[idx]

    labelled = label_batches(N, rows(), ts, 0, 7, BATCH)
    assert pulled == []
    next(labelled)
    assert pulled == [0]
    write_epoch_batches(fs, "e.parquet", label_batches(N, rows(), ts, 0, 7, BATCH), "fp32")

    reads = []
    read_row_group = pq.ParquetFile.read_row_group

    def spy(self, i, *args, **kwargs):
        reads.append((i, kwargs.get("columns")))
        return read_row_group(self, i, *args, **kwargs)

    def whole(self, *args, **kwargs):
        raise AssertionError("read the whole file")

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", whole)
    stream = read_epoch_batches(fs, "e.parquet", 0)
    assert len(next(stream)) == BATCH and reads == [(0, None)]
    assert len(list(stream)) == 4 and reads == [(b, None) for b in range(5)]


@pytest.mark.parametrize("row_group_size", [None, 7])
def test_older_files_still_stream(tmp_path, row_group_size):
    """A file from before #12 (one row group for the epoch), or one whose row groups cut
    batches (here 7 rows each), streams batch by batch as its whole-file read splits."""
    fs, ts = RunFS(tmp_path), teachers()
    lab = label_epoch(torch.randn(N, 3, SIZE, SIZE), ts, 1, 7, BATCH)
    table = epoch_table(lab, "fp16")
    pq.write_table(table, tmp_path / "e.parquet", row_group_size=row_group_size, **WRITE_OPTIONS)
    groups = pq.ParquetFile(tmp_path / "e.parquet").metadata.num_row_groups
    assert groups == (1 if row_group_size is None else 4)
    whole = read_epoch(fs, "e.parquet", 1)
    parts = list(read_epoch_batches(fs, "e.parquet", 1))
    assert len(parts) == 5
    for rows, part in zip(whole.batches(), parts, strict=True):
        assert_labels_equal(part, whole.select(rows))
    lists = epoch_image_batches(fs, "e.parquet")
    assert all(torch.equal(i, p.image_index) for i, p in zip(lists, parts, strict=True))


def test_a_failed_write_leaves_no_file(tmp_path):
    fs, ts = RunFS(tmp_path), teachers()
    images = torch.randn(N, 3, SIZE, SIZE)

    def failing():
        for b, idx in enumerate(epoch_batches(N, BATCH, 7, 0)):
            if b == 3:
                raise RuntimeError("killed mid-epoch")
            yield images[idx]

    with pytest.raises(RuntimeError, match="mid-epoch"):
        write_epoch_batches(fs, "e.parquet", label_batches(N, failing(), ts, 0, 7, BATCH), "fp16")
    assert list(tmp_path.iterdir()) == []


def test_streamed_student_equals_the_in_memory_student(tmp_path):
    """Two label epochs, SGD with momentum and a schedule, a student with batch norm: the
    streaming epoch and `train_student_epoch` give the same weights, bit for bit."""
    torch.manual_seed(0)
    fs, ts = RunFS(tmp_path), teachers()
    images = image_store(fs)
    for e in range(2):
        streamed_labels(fs, f"e{e}.parquet", ts, e, "fp16")
    a = tiny_teacher(seed=5)
    b = copy.deepcopy(a)

    def optimiser(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, 20)

    (opt_a, sched_a), (opt_b, sched_b) = optimiser(a), optimiser(b)
    for e in [0, 1, 1, 0]:
        rel = f"e{e}.parquet"
        old = train_student_epoch(a, opt_a, images, read_epoch(fs, rel, e), 20.0, sched_a)
        rows = row_batches(fs, "images.zarr", epoch_image_batches(fs, rel), "cpu", 0)
        pairs = zip(rows, read_epoch_batches(fs, rel, e), strict=True)
        new = train_student_batches(b, opt_b, pairs, 20.0, sched_b)
        assert new == old
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["fc.weight"], tiny_teacher(seed=5).state_dict()["fc.weight"])


def test_the_stages_stream_from_the_run_store(tmp_path, monkeypatch):
    monkeypatch.setattr(storage.labels, "ROW_GROUP_BYTES", 1)
    """The labels stage's write_one_epoch (images streamed from the run's store) and the
    validation stage's student epoch equal the in-memory paths."""
    cfg = parse_config(SMALL)
    ts = teachers(2, in_chans=1)
    with open_run(tmp_path, cfg) as run:
        open_data(run)
        images = image_store(run.fs, images_of(""), n=N, chans=1, size=28)
        write_one_epoch(run, None, ts, 1)  # streamed from synthesis/images.zarr
        write_one_epoch(run, images, ts, 1, prefix="memory/")  # the images held whole
        lc, pl = cfg.labels, cfg.preset_obj().labels
        scale = (pl.min_crop_scale, 1.0)
        old_write(
            run.fs,
            "old.parquet",
            label_epoch(images, ts, 1, cfg.seed, lc.batch_size, scale, pl.flip),
            lc.format,
            lc.topk,
        )
        want = read_epoch(run.fs, "old.parquet", 1)
        assert_labels_equal(read_epoch(run.fs, labels_epoch(1), 1), want)
        assert_labels_equal(read_epoch(run.fs, labels_epoch(1, "memory/"), 1), want)
        groups = pq.ParquetFile(run.fs.path(labels_epoch(1))).metadata.num_row_groups
        assert groups == -(-N // lc.batch_size)

        a = tiny_teacher(in_chans=1, seed=3)
        b = copy.deepcopy(a)
        opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
        opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
        old = train_student_epoch(a, opt_a, images, want, 20.0)
        new = _student_epoch(run, b, opt_b, None, 20.0, 1, "")
        assert new == old
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
