"""The dataset index (issue 12 point 4): written once into the run root by the first stage, equal
to the old `scan_tree` listing and fingerprint, read (never listed again) by later stages and
workers, on local and S3 roots; class rows without a scan of every sample; the random-real
baseline streamed a batch at a time into the same store the old code wrote."""

import hashlib
import json
import os
import pickle

import numpy as np
import pyarrow as pa
import pytest
import torch
import zarr
from PIL import Image
from safetensors.torch import save_file

import storage.dataset_index as dataset_index
import storage.folder_tree as folder_tree
import storage.imagefolder as imagefolder
import tasks.stages.baseline as baseline
import tasks.stages.real_images as real_images
from d3s_core.labelling import derive_seed
from storage.arrays import train_indices
from storage.config import parse_config
from storage.folder_tree import scan_tree, tree_fingerprint
from storage.fs import RunFS
from storage.imagefolder import ImageFolderDataset
from storage.manifest import CorruptArtifact
from storage.profile import write_profile
from storage.run import BASELINE, attach_run, images_of, open_run
from storage.webdataset import TarShardDataset
from tasks.stages import STAGES, open_data
from tasks.stages.common import class_of_each, class_rows, data_splits, new_model
from tasks.stages.profile import measure_profile
from tasks.stages.recipe import data_profile
from tasks.stages.synthesis import distilled_classes

from .helpers import make_samples, write_shards


def make_tree(root, per_class=(3, 4, 2, 3, 5, 3, 4, 3, 2, 3), seed=0):
    """10 class folders of 28 px greyscale PNGs; class 1 also holds a sub-folder and names that
    sort differently as paths and as strings ("a/x.png" before "a-b.png"), a hidden folder,
    an upper-case extension and a file that is not an image."""
    rng = np.random.default_rng(seed)

    def save(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), "L").save(path, "PNG")

    for c, n in enumerate(per_class):
        for i in range(n):
            save(root / f"class_{c:02d}" / f"{i}.png")
    save(root / "class_01" / "a" / "x.png")
    save(root / "class_01" / "a-b.PNG")
    (root / "class_01" / "notes.txt").write_text("not an image")
    save(root / ".hidden" / "0.png")
    return root


def folder_config(train, val, teacher, kind="imagefolder", **extra):
    return parse_config(
        {
            "preset": "demo-mnist",
            "dataset": {"kind": kind, "path": str(train), "val_path": str(val)},
            "teachers": {"count": 1, "import_from": [str(teacher)]},
            "stats": {"workers": 0},
            **extra,
        }
    )


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    p = parse_config({"preset": "demo-mnist"}).preset_obj()
    torch.manual_seed(0)
    save_file(new_model(p).state_dict(), root / "t.safetensors")
    return (
        make_tree(root / "train"),
        make_tree(root / "val", (1,) * 10, seed=1),
        root / "t.safetensors",
    )


def forbid_listing(monkeypatch):
    """Any listing or stat of a tree now fails the test."""

    def fail(*a, **k):
        raise AssertionError("the tree was listed again")

    for mod in (folder_tree, imagefolder, dataset_index):
        for name in ("scan_tree", "class_folders", "class_files", "tree_fingerprint", "list_tree"):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, fail)


def read_arrow(path):
    """An independent reader: plain pyarrow."""
    with pa.OSFile(str(path), "rb") as f:
        return pa.ipc.open_file(f).read_all()


# -- written once, equal to scan_tree ------------------------------------------------------------
def test_the_first_stage_writes_an_index_equal_to_scan_tree(tmp_path, trees):
    train, val, teacher = trees
    with open_run(tmp_path / "run", folder_config(train, val, teacher)) as run:
        STAGES["data"](run)
        STAGES["teachers"](run)
    index = json.loads((tmp_path / "run" / "dataset" / "index.json").read_text())
    assert index["schema_version"] == 1 and index["kind"] == "imagefolder"
    for split, tree in (("train", train), ("val", val)):
        classes, samples = scan_tree(tree)
        entry = index["splits"][split]
        table = read_arrow(tmp_path / "run" / entry["file"])
        assert table.column_names == ["path", "class", "size"]
        assert table.schema.field("class").type == pa.int32()
        assert (
            list(zip(table["path"].to_pylist(), table["class"].to_pylist(), strict=True)) == samples
        )
        assert table["size"].to_pylist() == [os.path.getsize(tree / r) for r, _ in samples]
        counts = np.bincount([c for _, c in samples]).tolist()
        assert entry["classes"] == classes and entry["counts"] == counts
        assert entry["offsets"] == np.cumsum([0, *counts])[:-1].tolist()
        assert entry["samples"] == len(samples) and entry["source"] == str(tree)
        assert entry["fingerprint"] == tree_fingerprint(tree, samples)
        data = (tmp_path / "run" / entry["file"]).read_bytes()
        assert entry["file_bytes"] == len(data)
        assert entry["file_sha256"] == hashlib.sha256(data).hexdigest()
    # Path order (component by component), not string order: the sub-folder first.
    paths = read_arrow(tmp_path / "run" / "dataset" / "train.arrow")["path"].to_pylist()
    assert paths.index("class_01/a/x.png") + 1 == paths.index("class_01/a-b.PNG")
    teacher_meta = json.loads((tmp_path / "run" / "teachers" / "teacher_0.json").read_text())
    assert teacher_meta["dataset_fingerprint"] == index["splits"]["train"]["fingerprint"]


def test_later_opens_read_the_index_and_never_list_the_tree(tmp_path, trees, monkeypatch):
    train, val, teacher = trees
    cfg = folder_config(train, val, teacher)
    with open_run(tmp_path / "run", cfg) as run:
        open_data(run)
        data_splits(run)  # writes the index (and the data profile)
        v = data_profile(run)["values"]
    rules = (28, 1, tuple(v["mean"]), tuple(v["std"]))
    ref_train = ImageFolderDataset(train, *rules, crop_ratio=v["crop_ratio"])
    ref_val = ImageFolderDataset(val, *rules, crop_ratio=v["crop_ratio"])
    forbid_listing(monkeypatch)
    with open_run(tmp_path / "run", cfg) as run:  # a later stage
        got = [data_splits(run)]
    got.append(data_splits(attach_run(tmp_path / "run", cfg)))  # a worker
    for tr, held, fingerprint in got:
        assert fingerprint == ref_train.fingerprint() == tr.fingerprint()
        assert tr.listing.file is not None  # memory-mapped from the index
        for ds, ref in ((tr, ref_train), (held, ref_val)):
            assert len(ds) == len(ref) and ds.classes == ref.classes
            for i in range(len(ref)):
                x, y = ds[i]
                assert torch.equal(x, ref[i][0]) and y == ref[i][1]
            got_px, ref_px = ds.pixel_items(range(len(ds))), ref.pixel_items(range(len(ref)))
            for (a, c), (b, d) in zip(got_px, ref_px, strict=True):
                assert torch.equal(a, b) and c == d
        # DataLoader workers and Dask get the file name, not the listing's rows.
        blob = pickle.dumps(tr)
        assert tr.listing.table.nbytes > 0 and b"class_01/a/x.png" not in blob
        again = pickle.loads(blob)
        assert torch.equal(again[5][0], ref_train[5][0]) and again[5][1] == ref_train[5][1]
        assert torch.equal(class_of_each(tr), torch.tensor([c for _, c in scan_samples(train)]))


_SCANNED: dict = {}


def scan_samples(tree):
    """scan_tree's samples, taken before any test forbids listing (module cache)."""
    return _SCANNED[str(tree)]


@pytest.fixture(autouse=True)
def _scan_first(trees):
    for tree in trees[:2]:
        _SCANNED.setdefault(str(tree), scan_tree(tree)[1])


def test_a_reader_without_an_index_lists_in_memory_and_writes_nothing(tmp_path, trees):
    train, val, teacher = trees
    cfg = folder_config(train, val, teacher)
    open_run(tmp_path / "run", cfg).close()  # the config only
    reader = attach_run(tmp_path / "run", cfg)
    write_profile(reader.fs, measure_profile(reader))  # a profile, and no index
    tr, _, fingerprint = data_splits(attach_run(tmp_path / "run", cfg))
    assert tr.listing.file is None and len(tr) == len(scan_samples(train))
    assert fingerprint == tree_fingerprint(train, scan_samples(train))
    assert sorted(p.name for p in (tmp_path / "run" / "dataset").iterdir()) == ["profile.json"]


def test_an_index_of_another_source_or_kind_or_damaged_is_refused(tmp_path, trees, monkeypatch):
    train, val, teacher = trees
    for where in ("a", "b"):  # the same relative dataset.path names two folders
        (tmp_path / where).mkdir()
        os.symlink(train, tmp_path / where / "train")
        os.symlink(val, tmp_path / where / "val")
    cfg = folder_config("train", "val", teacher)
    monkeypatch.chdir(tmp_path / "a")
    with open_run(tmp_path / "run", cfg) as run:
        open_data(run)
        data_splits(run)
    monkeypatch.chdir(tmp_path / "b")
    with open_run(tmp_path / "run", cfg) as run:
        with pytest.raises(
            ValueError, match=r"dataset/index\.json: the train split .*dataset\.path"
        ):
            data_splits(run)
    monkeypatch.chdir(tmp_path / "a")
    index = tmp_path / "run" / "dataset" / "index.json"
    data = json.loads(index.read_text())
    index.write_text(json.dumps({**data, "kind": "webdataset"}))  # its own checksum now fails
    with open_run(tmp_path / "run", cfg) as run:
        with pytest.raises(CorruptArtifact, match=r"index\.json: a damaged dataset index"):
            data_splits(run)
    other = {k: v for k, v in data.items() if k != "self_sha256"}  # an index of another kind
    index.write_text(json.dumps({**other, "kind": "webdataset"}))
    with open_run(tmp_path / "run", cfg) as run:
        with pytest.raises(ValueError, match=r"index\.json: indexes a 'webdataset'.*dataset\.kind"):
            data_splits(run)
    index.write_text(json.dumps(data))
    arrow = tmp_path / "run" / "dataset" / "train.arrow"
    arrow.write_bytes(arrow.read_bytes()[:-8])
    with open_run(tmp_path / "run", cfg) as run:
        with pytest.raises(CorruptArtifact, match=r"dataset/train\.arrow: does not match"):
            data_splits(run)


# -- class rows ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["imagefolder", "synthetic", "mnist5k", "webdataset"])
def test_class_rows_equal_the_nonzero_scan(tmp_path, trees, kind):
    train, val, teacher = trees
    if kind == "imagefolder":
        cfg = folder_config(train, val, teacher)
    elif kind == "webdataset":
        samples = make_samples(classes=10, per_class=3, size=28, rgb=False)
        shuffled = [samples[i] for i in np.random.default_rng(0).permutation(len(samples))]
        shards = write_shards(tmp_path / "shards", shuffled, [13, 17])
        vshards = write_shards(tmp_path / "vshards", samples[:10], [10], prefix="val")
        cfg = folder_config(shards, vshards, teacher, kind)
    else:
        cfg = parse_config(
            {"preset": "demo-mnist", "dataset": {"kind": kind, "synthetic_size": 97}}
        )
    with open_run(tmp_path / "run", cfg) as run:
        open_data(run)
        tr, _, _ = data_splits(run)
        rows = class_rows(run, tr)
    if kind == "imagefolder":  # independent of the index: the old listing
        y = torch.tensor([c for _, c in scan_samples(train)])
    else:
        y = class_of_each(tr)
    assert sum(len(rows.of(c)) for c in range(10)) == len(tr) == len(y)
    for c in range(12):
        got = rows.of(c)
        assert got.dtype == torch.int64 and torch.equal(got, torch.nonzero(y == c).flatten())


# -- the random-real baseline, streamed ----------------------------------------------------------
def old_baseline(train, y, num_classes, ipc, seed):
    """The old random_real_subset's draw and images."""
    classes = distilled_classes(num_classes, ipc)
    g = torch.Generator().manual_seed(derive_seed(seed, 400))
    chosen = {}
    for c in range(num_classes):
        pool = torch.nonzero(y == c).flatten()
        chosen[c] = pool[torch.randperm(len(pool), generator=g)[:ipc]].tolist()
    order = [chosen[c].pop(0) for c in classes.tolist()]
    return order, torch.stack([train[i][0] for i in order]), classes


@pytest.mark.parametrize("kind", ["imagefolder", "synthetic"])
def test_baseline_equals_the_old_store_written_a_batch_at_a_time(
    tmp_path, trees, kind, monkeypatch
):
    train, val, teacher = trees
    extra = {"synthesis": {"ipc": 2, "batch_size": 8}, "seed": 3}
    if kind == "imagefolder":
        cfg = folder_config(train, val, teacher, **extra)
    else:
        cfg = parse_config(
            {"preset": "demo-mnist", "dataset": {"kind": kind, "synthetic_size": 60}, **extra}
        )
    writes = []
    write = real_images.write_image_batch

    def spy(fs, rel, start, images):
        writes.append((start, len(images)))
        write(fs, rel, start, images)

    monkeypatch.setattr(real_images, "write_image_batch", spy)
    with open_run(tmp_path / "run", cfg) as run:
        STAGES["data"](run)
        tr, _, _ = data_splits(run)
        baseline.random_real_subset(run)
    y = torch.tensor([c for _, c in scan_samples(train)]) if kind == "imagefolder" else tr.classes
    order, images, classes = old_baseline(tr, y, 10, 2, 3)
    g = zarr.open_group(str(tmp_path / "run" / images_of(BASELINE)), mode="r")
    assert np.array_equal(np.asarray(g["images"][:]), images.numpy())
    assert np.array_equal(np.asarray(g["classes"][:]), classes.numpy())
    assert np.asarray(g["train_indices"][:]).tolist() == order
    assert g["train_indices"].dtype == np.int64 and "train_indices" not in g.attrs
    assert train_indices(RunFS(tmp_path / "run"), images_of(BASELINE)).tolist() == order
    assert g["images"].shards == (8, 1, 28, 28)
    assert writes == [(0, 8), (8, 8), (16, 4)]  # one shard per batch, never the whole set


def test_baseline_reads_train_indices_of_older_stores(tmp_path):
    g = zarr.open_group(str(tmp_path / "old.zarr"), mode="w")
    g.attrs["train_indices"] = [4, 1, 7]
    assert train_indices(RunFS(tmp_path), "old.zarr").tolist() == [4, 1, 7]


# -- tar shards: counts and fingerprint from the index ---------------------------------------------
def test_tar_shards_are_indexed_once(tmp_path, teacher_file, monkeypatch):
    samples = make_samples(classes=10, per_class=3, size=28, rgb=False)
    shards = write_shards(tmp_path / "shards", samples, [13, 17])
    vshards = write_shards(tmp_path / "vshards", samples[:10], [10], prefix="val")
    cfg = folder_config(shards, vshards, teacher_file, "webdataset")
    with open_run(tmp_path / "run", cfg) as run:
        open_data(run)
        _, _, fingerprint = data_splits(run)
    fresh = TarShardDataset(str(shards), 28, 1, (0.5,), (0.5,), 10)
    assert fingerprint == fresh.fingerprint()
    index = json.loads((tmp_path / "run" / "dataset" / "index.json").read_text())
    assert index["kind"] == "webdataset"
    entry = index["splits"]["train"]
    assert entry["source"] == str(shards) and entry["samples"] == 30
    assert entry["fingerprint"] == fingerprint
    assert entry["shards"] == [
        {
            "name": str(shards / f"train-{k:06d}.tar"),
            "bytes": os.path.getsize(shards / f"train-{k:06d}.tar"),
            "samples": n,
        }
        for k, n in enumerate([13, 17])
    ]

    def fail(*a, **k):
        raise AssertionError("a shard was read to count it")

    monkeypatch.setattr("storage.webdataset.index_shard", fail)
    monkeypatch.setattr(TarShardDataset, "_bytes", fail)
    tr, held, again = data_splits(attach_run(tmp_path / "run", cfg))
    assert again == fingerprint and len(tr) == 30 and len(held) == 10


@pytest.fixture
def teacher_file(trees):
    return trees[2]


# -- an S3 run root ------------------------------------------------------------------------------
def test_s3_root_writes_the_index_and_workers_map_a_local_copy(
    s3_endpoint,
    trees,
    tmp_path,
    monkeypatch,
):
    train, val, teacher = trees
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    opts = {"endpoint_url": s3_endpoint}
    cfg = folder_config(train, val, teacher)
    with open_run("s3://runs/indexed", cfg, **opts) as run:
        open_data(run)
        tr, _, fingerprint = data_splits(run)
        assert run.fs.exists("dataset/index.json") and run.fs.exists("dataset/train.arrow")
        entry = json.loads(run.fs.read_bytes("dataset/index.json"))["splits"]["train"]
    assert fingerprint == tree_fingerprint(train, scan_samples(train))
    fs = RunFS("s3://runs/indexed", **opts)
    with fs.fs.open(fs.path("dataset/train.arrow"), "rb") as f:  # straight from S3
        table = pa.ipc.open_file(pa.BufferReader(f.read())).read_all()
    assert table["path"].to_pylist() == [r for r, _ in scan_samples(train)]
    # A worker on another machine: an empty cache, filled from S3 once.
    for f in (tmp_path / "cache").rglob("*.arrow"):
        f.unlink()
    forbid_listing(monkeypatch)
    worker, _, again = data_splits(attach_run("s3://runs/indexed", cfg, **opts))
    assert again == fingerprint
    cached = tmp_path / "cache" / "d3s" / "dataset-index" / f"{entry['file_sha256']}.arrow"
    assert worker.listing.file == str(cached) and cached.is_file()
    assert all(worker.listing.path(i) == tr.listing.path(i) for i in range(len(tr)))
    assert torch.equal(worker[7][0], tr[7][0])
