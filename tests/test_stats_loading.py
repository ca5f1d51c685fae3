"""The statistics pass's loading (issue 16 point 6): images travel as uint8 and are normalised on
the device, bit for bit as the float path; one decode of each image feeds all M teachers; one
DataLoader for the whole pass; a shard missing for one teacher is recomputed for it alone and
equals the first computation; the result equals float64 numpy.cov of the measured layers."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from d3s_core.layers import FeatureHooks
from storage.arrays import read_teacher_stats
from storage.config import parse_config
from storage.datasets import NormalisedImages, normalise, synthetic_images
from storage.imagefolder import ImageFolderDataset
from storage.run import STATS, open_run
from storage.states import has_state, remove_state
from tasks.dask_stages import stats_plan_task, stats_shard_task
from tasks.stages import STAGES
from tasks.stages.common import batches, data_splits, load_teacher, new_model
from tasks.stages.stats import (
    by_shard,
    compute_shards,
    load_shard,
    missing_shards,
    select_layers,
    shard_key,
)

from .helpers import make_samples, tar_ds, write_shards, write_tree

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


# -- uint8 to the device, normalised there ----------------------------------------------------
@pytest.mark.parametrize("rgb", [True, False])
def test_pixels_normalised_equal_the_float_samples_bit_for_bit(tmp_path, rgb):
    """ImageFolder and tar shards: uint8 (C, H, W) pixels, normalised, equal the float samples
    (torchvision's to_tensor + normalize) to the bit; and a float64 numpy reference to 1 ulp."""
    samples = make_samples(per_class=3, size=23, rgb=rgb)  # 23 px: resized to 18, cropped
    chans = 3 if rgb else 1
    mean, std = MEAN[:chans], STD[:chans]
    tree = ImageFolderDataset(write_tree(tmp_path / "tree", samples), 16, chans, mean, std)
    shards = tar_ds(str(write_shards(tmp_path / "shards", samples, [5, 7])), rgb=rgb)
    for ds in (tree, shards):
        items = ds.pixel_items(range(len(ds)))
        px = torch.stack([x for x, _ in items])
        assert px.dtype == torch.uint8 and px.shape == (12, chans, 16, 16)
        assert [c for _, c in items] == [ds[i][1] for i in range(len(ds))]
        floats = torch.stack([ds[i][0] for i in range(len(ds))])
        assert torch.equal(normalise(px, mean, std), floats)
        ref = (px.double().numpy() / 255 - np.reshape(mean, (-1, 1, 1))) / np.reshape(
            std, (-1, 1, 1)
        )
        np.testing.assert_allclose(floats.numpy(), ref, rtol=2e-7, atol=2e-7)


def test_in_memory_sets_normalised_on_the_device_equal_the_old_tensors():
    images, classes = synthetic_images(37, 10, 1, 28, seed=0)
    ds = NormalisedImages(images, classes, (0.1307,), (0.3081,))
    run = SimpleNamespace(config=SimpleNamespace(device="cpu", stats=SimpleNamespace(workers=0)))
    x_all, y_all = ds.tensors()
    got = list(batches(run, ds, 8))
    assert torch.equal(torch.cat([x for x, _ in got]), x_all)
    assert torch.equal(torch.cat([y for _, y in got]), y_all)
    order = torch.randperm(37, generator=torch.Generator().manual_seed(4))
    shuffled = list(batches(run, ds, 8, torch.Generator().manual_seed(4)))
    assert torch.equal(torch.cat([x for x, _ in shuffled]), x_all[order])


class SpyLoader(torch.utils.data.DataLoader):
    """A DataLoader that records its construction and the dtype of every batch it yields."""

    made: list[int] = []
    dtypes: list[torch.dtype] = []

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        SpyLoader.made.append(1)

    def __iter__(self):
        for x, y in super().__iter__():
            SpyLoader.dtypes.append(x.dtype)
            yield x, y


@pytest.fixture
def spy(monkeypatch):
    SpyLoader.made, SpyLoader.dtypes = [], []
    monkeypatch.setattr(torch.utils.data, "DataLoader", SpyLoader)
    return SpyLoader


@pytest.mark.parametrize("workers", [0, 2])
def test_loaders_ship_uint8_and_batches_are_the_float_path(tmp_path, spy, workers):
    """Sequential and shuffled (teacher training) batches of an image-file dataset: the loader
    yields uint8, `batches` gives what the float DataLoader gave before, bit for bit."""
    samples = make_samples(per_class=5, size=16)
    ds = ImageFolderDataset(write_tree(tmp_path / "tree", samples), 16, 3, MEAN, STD)
    run = SimpleNamespace(
        config=SimpleNamespace(device="cpu", stats=SimpleNamespace(workers=workers))
    )
    floats = torch.stack([ds[i][0] for i in range(len(ds))])
    got = list(batches(run, ds, 6, None, 1, 3))  # samples 6..17
    assert [x.dtype for x, _ in got] == [torch.float32] * 2
    assert torch.equal(torch.cat([x for x, _ in got]), floats[6:18])
    shuffled = list(batches(run, ds, 6, torch.Generator().manual_seed(2)))
    # Before: a DataLoader over the float samples, shuffled with the same seed.
    old = torch.utils.data.DataLoader(
        ds, batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(2)
    )
    for (x, y), (x_old, y_old) in zip(shuffled, old, strict=True):
        assert torch.equal(x, x_old) and torch.equal(y, y_old)
    assert spy.dtypes[: 2 + len(shuffled)] == [torch.uint8] * (2 + len(shuffled))


# -- one decode for M teachers, resumable shards ------------------------------------------------
def image_run(tmp_path, teachers=2, precision="float64"):
    """demo-mnist on an ImageFolder tree of 30 greyscale 28 px PNGs, M imported teachers;
    batches of 4 (8 batches), 3 per shard (shards of 12, 12, 6 images)."""
    train = make_samples(classes=10, per_class=3, size=28, rgb=False)
    val = make_samples(classes=10, per_class=1, size=28, rgb=False, seed=1)
    p = parse_config({"preset": "demo-mnist"}).preset_obj()
    weights = []
    for m in range(teachers):
        torch.manual_seed(m)
        weights.append(str(tmp_path / f"t{m}.safetensors"))
        save_file(new_model(p).state_dict(), weights[-1])
    return parse_config(
        {
            "preset": "demo-mnist",
            "dataset": {
                "kind": "imagefolder",
                "path": str(write_tree(tmp_path / "tree", train)),
                "val_path": str(write_tree(tmp_path / "vtree", val)),
            },
            "teachers": {"count": teachers, "import_from": weights},
            "stats": {
                "batch_size": 4,
                "workers": 0,
                "checkpoint_batches": 3,
                "precision": precision,
            },
        }
    )


@pytest.fixture
def decodes(monkeypatch):
    """Indices of every image decoded (in this process: workers 0)."""
    seen: list[int] = []
    load = ImageFolderDataset.load

    def counting(self, i):
        seen.append(i)
        return load(self, i)

    monkeypatch.setattr(ImageFolderDataset, "load", counting)
    return seen


def forwards(model):
    """A list that grows by one per forward pass of `model`."""
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_one_decode_feeds_every_teacher_and_equals_numpy_cov(tmp_path, spy, decodes):
    torch.set_num_threads(1)
    cfg = image_run(tmp_path)
    with open_run(tmp_path / "run", cfg) as run:
        STAGES["data"](run)
        STAGES["teachers"](run)
        decodes.clear()
        spy.made.clear()
        STAGES["stats"](run)
        assert sorted(decodes) == list(range(30))  # once each, for both teachers
        assert len(spy.made) == 1  # one DataLoader for the whole pass (3 shards)
        assert set(spy.dtypes) == {torch.uint8}
        train = data_splits(run)[0]
        for m in range(2):
            got = read_teacher_stats(run.fs, STATS, m)
            model = load_teacher(run, m)
            names = select_layers(model, cfg.stats.layers)
            assert got["layers"] == names
            # Reference: the float samples, the same batches of 4, float64 numpy.
            acts: dict[str, list[np.ndarray]] = {n: [] for n in names}
            with FeatureHooks(model, names) as hooks, torch.no_grad():
                for b in range(0, 30, 4):
                    model(torch.stack([train[i][0] for i in range(b, min(30, b + 4))]))
                    for n, a in zip(names, hooks.outputs, strict=True):
                        acts[n].append(a.permute(0, 2, 3, 1).reshape(-1, a.shape[1]).double())
            for n, (count, mu, cov) in zip(names, got["stats"], strict=True):
                x = torch.cat(acts[n]).numpy()
                assert count == x.shape[0]
                ref_cov = np.cov(x, rowvar=False, bias=True)
                scale = np.abs(ref_cov).max()
                assert np.abs(mu.numpy() - x.mean(0)).max() <= 1e-10 * np.abs(x).max()
                assert np.abs(cov.numpy() - ref_cov).max() <= 1e-10 * scale


def test_a_missing_shard_is_recomputed_for_its_teachers_only(tmp_path, decodes):
    """Delete teacher 1's shard 1 and teacher 0's shard 2: the plan names just those; shard 1
    is read for teacher 1 alone, shard 2 for teacher 0 alone, the other shards not at all, and
    the files equal the first pass's. In process, then as the Dask task does it."""
    torch.set_num_threads(1)
    cfg = image_run(tmp_path)
    root = tmp_path / "run"
    with open_run(root, cfg) as run:
        STAGES["data"](run)
        STAGES["teachers"](run)
        train = data_splits(run)[0]
        models = {m: load_teacher(run, m) for m in range(2)}
        teachers = {m: (models[m], select_layers(models[m], cfg.stats.layers)) for m in models}
        calls = {m: forwards(models[m]) for m in models}
        plan = by_shard(missing_shards(run, len(train)))
        assert plan == {0: [0, 1], 1: [0, 1], 2: [0, 1]}
        decodes.clear()
        compute_shards(run, teachers, train, plan)
        assert sorted(decodes) == list(range(30))
        assert [len(calls[m]) for m in (0, 1)] == [8, 8]  # 8 batches through each teacher
        first = {(m, s): load_shard(run, m, s) for m in range(2) for s in range(3)}

        for way in ("in process", "dask task"):
            remove_state(run.fs, shard_key(1, 1))
            remove_state(run.fs, shard_key(0, 2))
            assert not has_state(run.fs, shard_key(1, 1)) and has_state(run.fs, shard_key(0, 1))
            plan = by_shard(missing_shards(run, len(train)))
            assert plan == {1: [1], 2: [0]}
            decodes.clear()
            for m in calls:
                calls[m].clear()
            if way == "in process":
                compute_shards(run, teachers, train, plan)
                assert [len(calls[m]) for m in (0, 1)] == [2, 3]  # shard 2: 2 batches; 1: 3
            else:
                c = cfg.model_dump(mode="json")
                todo = stats_plan_task.fn(str(root), c)
                assert sorted(todo) == [(0, 2), (1, 1)]
                for s, ms in by_shard(todo).items():
                    stats_shard_task.fn(str(root), c, s, ms)
            assert sorted(decodes) == list(range(12, 30))  # shards 1 and 2 only, once each
            for m, s in [(1, 1), (0, 2)]:
                for a, b in zip(first[m, s], load_shard(run, m, s), strict=True):
                    # Same batches, same model, same threads: the same bits.
                    assert a.n == b.n and torch.equal(a.mean, b.mean) and torch.equal(a.m2, b.m2)
        STAGES["stats"](run)  # nothing left to compute: merges
        assert decodes == list(range(12, 30))
        resumed = [read_teacher_stats(run.fs, STATS, m)["stats"] for m in range(2)]
    with open_run(tmp_path / "clean", cfg) as run:
        STAGES["data"](run)
        STAGES["teachers"](run)
        STAGES["stats"](run)
        clean = [read_teacher_stats(run.fs, STATS, m)["stats"] for m in range(2)]
    for r, c in zip(resumed, clean, strict=True):
        for (n_r, mu_r, cov_r), (n_c, mu_c, cov_c) in zip(r, c, strict=True):
            assert n_r == n_c
            assert (mu_r - mu_c).abs().max() <= 1e-12 * mu_c.abs().max().clamp_min(1)
            assert (cov_r - cov_c).abs().max() <= 1e-12 * cov_c.abs().max()
