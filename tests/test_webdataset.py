"""Tar-sharded datasets (the WebDataset layout) read like the ImageFolder tree of the same
images: same tensors in the same order, batches [a, b) equal to the slice of a full pass, the
statistics stage equal to 1e-10, through fsspec URLs too; bad shards get errors naming them."""

import json
import tarfile
from types import SimpleNamespace

import fsspec
import pytest
import torch
from safetensors.torch import save_file

from storage.arrays import read_teacher_stats
from storage.config import parse_config
from storage.imagefolder import ImageFolderDataset
from storage.run import STATS, open_run
from storage.webdataset import expand_braces
from tasks.dask_stages import stats_plan_task, stats_shard_task
from tasks.stages import STAGES
from tasks.stages.common import batches, class_of_each, new_model
from tasks.stages.stats import by_shard

from .helpers import WDS_MEAN as MEAN
from .helpers import WDS_STD as STD
from .helpers import make_samples, tar_add, tar_ds, write_shards, write_tree

COUNTS = [7, 2, 11]  # uneven shards, 20 samples, 4 classes


@pytest.fixture
def data(tmp_path):
    samples = make_samples()
    return (
        write_shards(tmp_path / "shards", samples, COUNTS),
        write_tree(tmp_path / "tree", samples),
    )


def test_brace_patterns():
    assert expand_braces("a-{08..11}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar", "a-11.tar"]
    assert expand_braces("{x,y}/{0..1}") == ["x/0", "x/1", "y/0", "y/1"]


def test_samples_equal_the_imagefolder_tree(data):
    shards, tree = data
    ref = ImageFolderDataset(tree, 16, 3, MEAN, STD)
    for spec in (
        str(shards),
        f"{shards}/train-{{000000..000002}}.tar",
        [str(p) for p in sorted(shards.glob("*.tar"))],
    ):
        ds = tar_ds(spec)
        assert len(ds) == len(ref) == 20 and ds.num_classes == 4
        for i in range(len(ref)):
            x, y = ds[i]
            assert torch.equal(x, ref[i][0]) and y == ref[i][1]
        assert torch.equal(class_of_each(ds), class_of_each(ref))
    before = tar_ds(str(shards)).fingerprint()
    assert before == tar_ds(str(shards)).fingerprint()
    write_shards(shards, make_samples()[:19], [7, 2, 10])
    assert tar_ds(str(shards)).fingerprint() != before


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_across_shard_boundaries_equal_the_full_pass(data, workers):
    shards, _ = data
    run = SimpleNamespace(config=SimpleNamespace(device="cpu", stats=SimpleNamespace(workers=0)))
    full = [x for x, _ in batches(run, tar_ds(str(shards)), 3)]
    full_x = torch.cat(full)
    run.config.stats.workers = workers
    ds = tar_ds(str(shards))
    # batches 2..4 are samples 6..14, across the shard boundaries at 7 and 9
    got = list(batches(run, ds, 3, None, 2, 5))
    assert [len(x) for x, _ in got] == [3, 3, 3]
    assert torch.equal(torch.cat([x for x, _ in got]), full_x[6:15])
    assert torch.equal(torch.cat([y for _, y in got]), class_of_each(ds)[6:15])
    last = list(batches(run, ds, 3, None, 6, None))  # the short last batch
    assert torch.equal(torch.cat([x for x, _ in last]), full_x[18:])


def test_shuffled_epochs_are_seeded_and_complete(data):
    shards, _ = data
    ds = tar_ds(str(shards))
    a = ds.shuffled_order(torch.Generator().manual_seed(1), shards_at_once=2)
    assert a == ds.shuffled_order(torch.Generator().manual_seed(1), shards_at_once=2)
    assert sorted(a) == list(range(20)) and a != list(range(20))
    run = SimpleNamespace(config=SimpleNamespace(device="cpu", stats=SimpleNamespace(workers=0)))
    ys = torch.cat([y for _, y in batches(run, ds, 4, torch.Generator().manual_seed(1))])
    assert sorted(ys.tolist()) == sorted(class_of_each(ds).tolist())


def test_fsspec_urls(data):
    shards, _ = data
    ref = torch.stack([x for x, _ in tar_ds(str(shards)).__getitems__(list(range(20)))])
    mem = fsspec.filesystem("memory")
    try:
        for p in shards.glob("*.tar"):
            mem.pipe(f"/wds-test/{p.name}", p.read_bytes())
        for spec in (
            f"file://{shards}",
            f"file://{shards}/train-{{000000..000002}}.tar",
            "memory://wds-test",
            "memory://wds-test/train-{000000..000002}.tar",
        ):
            ds = tar_ds(spec)
            assert len(ds) == 20
            assert torch.equal(torch.stack([x for x, _ in ds.__getitems__(list(range(20)))]), ref)
        assert "memory://" in tar_ds("memory://wds-test").where(0)
    finally:
        mem.rm("/wds-test", recursive=True)


def test_sizes_json_gives_the_length_and_is_checked(data):
    shards, _ = data
    (shards / "sizes.json").write_text(json.dumps({"train-000000.tar": 7, "train-000001.tar": 2}))
    ds = tar_ds(str(shards))
    assert ds._counts == [7, 2, None] and len(ds) == 20
    (shards / "sizes.json").write_text(json.dumps({"train-000001.tar": 3}))
    ds = tar_ds(str(shards))
    with pytest.raises(ValueError, match=r"train-000001\.tar: holds 2 samples.*sizes\.json.*3"):
        ds[7]


# -- errors ---------------------------------------------------------------------------------
def test_missing_shard(data):
    shards, _ = data
    with pytest.raises(FileNotFoundError, match=r"train-000003\.tar: tar shard does not exist"):
        len(tar_ds(f"{shards}/train-{{000000..000003}}.tar"))
    with pytest.raises(FileNotFoundError, match="nothing-here: neither a folder"):
        tar_ds(str(shards / "nothing-here"))
    (shards / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: folder holds no .tar shards"):
        tar_ds(str(shards / "empty"))


@pytest.mark.parametrize("where", ["data", "header", "no end marker", "half end marker"])
def test_truncated_tar(data, where):
    shards, _ = data
    p = shards / "train-000001.tar"
    with tarfile.open(p) as tf:
        last = tf.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512
    cut = {
        "data": last.offset_data + 3,
        "header": last.offset + 100,
        "no end marker": end,
        "half end marker": end + 600,
    }[where]
    p.write_bytes(p.read_bytes()[:cut])
    with pytest.raises(ValueError, match=r"train-000001\.tar: .*truncated"):
        len(tar_ds(str(shards)))


def bad_shard(folder, members):
    folder.mkdir()
    with tarfile.open(folder / "train-000000.tar", "w") as tf:
        for name, data in members:
            tar_add(tf, name, data)
    return str(folder)


def test_bad_samples_are_named(tmp_path):
    img = make_samples(1, 1)[0][2]
    cases = [
        ([("a.png", img), ("a.cls", b"1"), ("b.cls", b"2")], r"sample 'b' has no image"),
        ([("a.png", img), ("b.png", img), ("b.cls", b"2")], r"a\.png: sample 'a' has no \.cls"),
        ([("a.png", img), ("a.cls", b"4")], r"a\.cls: class 4 outside 0\.\.3"),
        ([("a.png", img), ("a.cls", b"x")], r"a\.cls: class is not an integer"),
        ([("a.png", img), ("a.jpg", img), ("a.cls", b"0")], r"a\.jpg: sample 'a' has two"),
    ]
    for i, (members, message) in enumerate(cases):
        with pytest.raises(ValueError, match=rf"train-000000\.tar: .*{message}"):
            len(tar_ds(bad_shard(tmp_path / str(i), members)))
    junk = [("a.png", img), ("a.cls", b"0"), ("b.png", b"junk"), ("b.cls", b"1")]
    ds = tar_ds(bad_shard(tmp_path / "junk", junk))
    assert ds[0][1] == 0
    with pytest.raises(ValueError, match=r"train-000000\.tar: b\.png: unreadable image"):
        ds[1]


# -- the statistics stage --------------------------------------------------------------------
def stats_config(kind, train, val, teacher):
    return parse_config(
        {
            "preset": "demo-mnist",
            "dataset": {"kind": kind, "path": str(train), "val_path": str(val)},
            "teachers": {"count": 1, "import_from": [str(teacher)]},
            "stats": {"batch_size": 8, "workers": 0, "checkpoint_batches": 2},
        }
    )


def test_statistics_stage_equals_the_imagefolder_tree(tmp_path):
    """Also shard by shard as the Dask workers compute them (tasks/dask_stages.py, in-process)."""
    torch.set_num_threads(1)
    train = make_samples(classes=10, per_class=4, size=28, rgb=False)
    val = make_samples(classes=10, per_class=1, size=28, rgb=False, seed=1)
    p = parse_config({"preset": "demo-mnist"}).preset_obj()
    torch.manual_seed(0)
    save_file(new_model(p).state_dict(), tmp_path / "t.safetensors")
    runs = {
        "imagefolder": (write_tree(tmp_path / "tree", train), write_tree(tmp_path / "vtree", val)),
        "webdataset": (
            write_shards(tmp_path / "shards", train, [13, 10, 17]),
            write_shards(tmp_path / "vshards", val, [10], prefix="val"),
        ),
    }
    runs["dask-tasks"] = runs["webdataset"]
    stats = {}
    for name, (tr, va) in runs.items():
        kind = "imagefolder" if name == "imagefolder" else "webdataset"
        cfg = stats_config(kind, tr, va, tmp_path / "t.safetensors")
        with open_run(tmp_path / name, cfg) as r:
            STAGES["data"](r)
            STAGES["teachers"](r)
        if name == "dask-tasks":  # what each Dask worker runs, shard by shard
            c = cfg.model_dump(mode="json")
            todo = stats_plan_task.fn(str(tmp_path / name), c)
            assert len(todo) == 3  # 40 samples, batch 8, 2 batches a shard; tar shards 13/10/17
            for s, ms in by_shard(todo).items():
                stats_shard_task.fn(str(tmp_path / name), c, s, ms)
        with open_run(tmp_path / name, cfg) as r:
            STAGES["stats"](r)
            stats[name] = read_teacher_stats(r.fs, STATS, 0)
    ref = stats["imagefolder"]
    for got in (stats["webdataset"], stats["dask-tasks"]):
        assert got["layers"] == ref["layers"] and got["fingerprint"].startswith("webdataset:")
        for (n_r, mu_r, cov_r), (n, mu, cov) in zip(ref["stats"], got["stats"], strict=True):
            assert n == n_r
            assert (mu - mu_r).abs().max() <= 1e-10 * mu_r.abs().max().clamp_min(1)
            assert (cov - cov_r).abs().max() <= 1e-10 * cov_r.abs().max()
