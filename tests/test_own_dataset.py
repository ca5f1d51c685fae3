"""Bring your own dataset (issue 13): shapes, classes and normalisation come from the data; the
preset is a recipe applied to it. Two trees generated here, neither a preset's shape: RGB,
10 classes, 32 px; greyscale, 3 classes, odd non-square sizes. Each goes through every stage."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from storage.config import parse_config
from storage.fs import RunFS
from storage.imagefolder import _fit
from storage.profile import read_profile
from storage.run import open_run, read_results
from tasks.stages import STAGES, open_data
from tasks.stages.recipe import data_profile, recipe

from .helpers import grey_tree, rgb_image, rgb_tree, tiny


def run_all(root: Path, raw: dict) -> dict:
    cfg = parse_config(raw)
    with open_run(str(root), cfg) as run:
        for stage in STAGES.values():
            stage(run)
        return {"profile": data_profile(run), "recipe": recipe(run)}


def numpy_moments(files: list[Path], size: int, ratio: float, mode: str):
    """Independent reference: every training image through PIL and numpy's float64 mean/std."""
    arrays = []
    for f in files:
        img = Image.open(f).convert(mode)
        arrays.append(np.asarray(_fit(img, size, ratio), dtype=np.float64) / 255.0)
    x = np.stack(arrays)
    x = x[..., None] if x.ndim == 3 else x
    return x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2))


def test_rgb_ten_class_tree_runs_every_stage_with_its_own_shape(tmp_path):
    data = rgb_tree(tmp_path / "data")
    out = run_all(
        tmp_path / "run",
        tiny({"path": str(data / "train"), "val_path": str(data / "val")}),
    )
    prof, r = out["profile"], out["recipe"]
    v = prof["values"]
    assert (v["num_classes"], v["channels"], v["image_size"], v["crop_ratio"]) == (10, 3, 32, 1.0)
    assert (r.num_classes, r.in_chans, r.image_size) == (10, 3, 32)
    assert prof["sources"]["num_classes"].startswith("data: 10 class folders")
    assert prof["sources"]["mean"].startswith("data: measured over the pixels of all 120")
    files = sorted((data / "train").rglob("*.png"))
    mean, std = numpy_moments(files, 32, 1.0, "RGB")
    np.testing.assert_allclose(v["mean"], mean, atol=1e-6, rtol=0)
    np.testing.assert_allclose(v["std"], std, atol=1e-6, rtol=0)
    assert abs(v["mean"][0] - 0.1307) > 0.05  # not MNIST's constant
    # The recipe used it: the images were synthesised in this normalised space, at this shape.
    fs = RunFS(str(tmp_path / "run"))
    assert read_profile(fs) == prof
    meta = json.loads(fs.read_bytes("teachers/teacher_0.json"))
    assert (meta["num_classes"], meta["in_chans"], meta["image_size"]) == (10, 3, 32)
    np.testing.assert_allclose(meta["mean"], v["mean"])
    import zarr

    g = zarr.open_group(str(tmp_path / "run" / "synthesis" / "images.zarr"), mode="r")
    assert g["images"].shape == (10, 3, 32, 32)
    np.testing.assert_allclose(g.attrs["mean"], v["mean"])
    results = read_results(fs, 1)
    assert 0.0 <= results["summary"]["mean"] <= 1.0


def test_grey_three_class_tree_of_odd_sizes(tmp_path):
    data = grey_tree(tmp_path / "data")
    out = run_all(
        tmp_path / "run",
        tiny({"path": str(data / "train"), "val_path": str(data / "val")}),
    )
    prof, r = out["profile"], out["recipe"]
    v = prof["values"]
    # Sizes vary: the preset's 28 px, ImageNet's 8/7 rule; one channel, 3 classes from the tree.
    assert (v["num_classes"], v["channels"], v["image_size"]) == (3, 1, 28)
    assert v["crop_ratio"] == pytest.approx(8 / 7)
    assert prof["sources"]["image_size"].startswith("preset 'demo-mnist': short sides vary")
    assert prof["inspected"]["modes"] == {"L": 36}
    assert prof["inspected"]["short_side"]["min"] == 23
    assert (r.num_classes, r.in_chans) == (3, 1)
    files = sorted((data / "train").rglob("*.png"))
    mean, std = numpy_moments(files, 28, 8 / 7, "L")
    np.testing.assert_allclose(v["mean"], mean, atol=1e-6, rtol=0)
    np.testing.assert_allclose(v["std"], std, atol=1e-6, rtol=0)
    fs = RunFS(str(tmp_path / "run"))
    assert read_results(fs, 1)["summary"]["mean"] >= 0.0


def test_declared_shape_wins_and_colour_is_converted_by_the_stated_rule(tmp_path):
    """dataset.channels: 1 on an RGB tree converts by luma; dataset.image_size and mean/std
    declared are used as they are, and the profile says they came from the config."""
    from tasks.stages.common import data_splits

    data = rgb_tree(tmp_path / "data", classes=2, per_class=2, val=1)
    raw = tiny(
        {
            "path": str(data / "train"),
            "val_path": str(data / "val"),
            "channels": 1,
            "image_size": 16,
            "mean": [0.5],
            "std": [0.25],
        }
    )
    with open_run(str(tmp_path / "run"), parse_config(raw)) as run:
        open_data(run)
        prof = data_profile(run)
        train, _, _ = data_splits(run)
        x, _ = train[0]
    v, src = prof["values"], prof["sources"]
    assert (v["channels"], v["image_size"], v["mean"], v["std"]) == (1, 16, [0.5], [0.25])
    assert src["channels"] == "config: dataset.channels"
    assert src["mean"] == "config: dataset.mean, dataset.std"
    assert v["crop_ratio"] == pytest.approx(8 / 7)  # 32 px images into 16 px
    first = sorted((data / "train" / "class_00").glob("*.png"))[0]
    luma = Image.open(first).convert("L")
    want = torch.from_numpy(np.asarray(_fit(luma, 16, 8 / 7), dtype=np.float32) / 255.0)
    torch.testing.assert_close(x[0], (want - 0.5) / 0.25, atol=1e-6, rtol=0)


def test_a_colour_image_in_a_tree_detected_as_grey_is_refused_naming_file_and_key(tmp_path):
    data = grey_tree(tmp_path / "data", classes=2, per_class=3, val=1)
    raw = tiny(
        {"path": str(data / "train"), "val_path": str(data / "val"), "profile_samples": 1},
    )
    # One inspected image (seeded sample of 1): every other image may be colour unnoticed.
    with open_run(str(tmp_path / "run"), parse_config(raw)) as run:
        open_data(run)
        prof = data_profile(run)
        assert prof["values"]["channels"] == 1
        for f in sorted((data / "train").rglob("*.png")):
            Image.open(f).convert("RGB").save(f)
        from tasks.stages.common import data_splits

        train, _, _ = data_splits(run)
        with pytest.raises(ValueError) as e:
            for i in range(len(train)):
                train[i]
    msg = str(e.value)
    assert ".png" in msg and "1 channel" in msg and "dataset.channels: 3" in msg


def test_imported_teacher_of_other_channels_is_refused_naming_file_and_key(tmp_path):
    from d3s_core.models import build_model
    from storage.states import weights_blob

    data = grey_tree(tmp_path / "data", classes=3, per_class=2, val=1)
    weights = tmp_path / "rgb_teacher.safetensors"
    rgb = build_model("small_resnet", 3, in_chans=3, low_res=True, width=4)
    weights.write_bytes(weights_blob(rgb.state_dict()))
    raw = tiny(
        {"path": str(data / "train"), "val_path": str(data / "val")},
        teachers={"count": 1, "import_from": [str(weights)]},
    )
    with open_run(str(tmp_path / "run"), parse_config(raw)) as run, pytest.raises(ValueError) as e:
        STAGES["data"](run)
        STAGES["teachers"](run)
    msg = str(e.value)
    assert str(weights) in msg and "3-channel" in msg and "dataset.channels: 3" in msg


def test_recipe_fields_override_the_preset_field_by_field():
    cfg = parse_config(
        {
            "preset": "imagenet-1k",
            "dataset": {"kind": "synthetic"},
            "model": {"arch": "small_resnet", "width": 8, "low_res": True},
            "labels": {"params": {"min_crop_scale": 0.5, "flip": False}},
            "validation": {"params": {"lr": 0.01, "optimizer": "sgd"}},
        }
    )
    assert (cfg.teachers.count, cfg.synthesis.ipc, cfg.labels.epochs) == (5, 10, 300)
    lc, sc = cfg.label_cfg(), cfg.student_cfg()
    assert (lc.min_crop_scale, lc.flip, lc.epochs) == (0.5, False, 300)
    assert (sc.lr, sc.optimizer, sc.weight_decay) == (0.01, "sgd", 1e-4)
    src = cfg.recipe_sources()
    assert src["model.arch"] == ("small_resnet", "config")
    assert src["teachers.count"] == (5, "preset")
    assert src["labels.params.flip"] == (False, "config")
    assert src["validation.params.lr"] == (0.01, "config")
    assert src["teachers.train.lr"] == (0.1, "preset")


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"model": {"arch": "timm:no_such_model_x"}}, "model.arch: 'timm:no_such_model_x'"),
        ({"model": {"width": 0}}, "model.width: 0 must be >= 1"),
        ({"dataset": {"channels": 2}}, "dataset.channels"),
        ({"validation": {"params": {"students": 3}}}, "set validation.students instead"),
        ({"labels": {"params": {"bogus": 1}}}, "unknown key(s) ['bogus'] in labels.params"),
    ],
)
def test_a_mismatched_override_is_a_clear_error(bad, message):
    with pytest.raises(ValueError) as e:
        parse_config({"preset": "demo-mnist", **bad}, "my.json")
    assert message in str(e.value) and str(e.value).startswith("my.json")


def test_webdataset_classes_channels_and_size_come_from_the_shards(tmp_path):
    rng = np.random.default_rng(2)
    shards = tmp_path / "shards"
    for split, n in (("train", 16), ("val", 4)):
        (shards / split).mkdir(parents=True)
        with tarfile.open(shards / split / f"{split}-000000.tar", "w") as tf:
            for i in range(n):
                c = i % 4
                buf = io.BytesIO()
                rgb_image(c, i, 24, rng).resize((30, 24)).save(buf, "PNG")
                for name, blob in ((f"{i:05d}.png", buf.getvalue()), (f"{i:05d}.cls", b"%d" % c)):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tf.addfile(info, io.BytesIO(blob))
    raw = tiny(
        {"kind": "webdataset", "path": str(shards / "train"), "val_path": str(shards / "val")}
    )
    with open_run(str(tmp_path / "run"), parse_config(raw)) as run:
        open_data(run)
        prof = data_profile(run)
    v = prof["values"]
    assert (v["num_classes"], v["channels"], v["image_size"], v["crop_ratio"]) == (4, 3, 24, 1.0)
    assert prof["sources"]["num_classes"].startswith("data: classes 0..3")
