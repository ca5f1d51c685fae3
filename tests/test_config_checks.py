"""Every value of a configuration is checked, and the error names its key (issue 11, point 3);
a root's configuration is fixed by its first artifact, not by a failed start, and a refused
configuration names the keys that differ (point 4)."""

import dataclasses
import json
import re

import pytest

from d3s_core.presets import PRESETS
from storage.config import DistributedSpec, parse_config, save_config
from storage.fs import RunFS
from storage.manifest import MANIFEST
from storage.recipes import RECIPES
from storage.run import open_run

from .helpers import folder_config, make_tree, run_teachers


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_validates(preset):
    cfg = parse_config({"preset": preset})
    assert cfg.teacher_train() == PRESETS[preset].teacher
    assert cfg.synthesis_cfg() == PRESETS[preset].synthesis


def test_the_shipped_configs_validate():
    from pathlib import Path

    from storage.study import StudySpec, plan_study

    configs = Path(__file__).resolve().parent.parent / "configs"
    for path in sorted(configs.glob("*.json")):
        data = json.loads(path.read_text())
        if "variants" in data:
            plan_study(StudySpec.model_validate(data))
        else:
            parse_config(data, str(path))


def params(**kw):
    return {"synthesis": {"params": kw}}


def train(**kw):
    return {"teachers": {"train": kw}}


BAD = [
    # synthesis.params (SynthesisParams, storage/recipes.py)
    (params(lr=-0.1), "synthesis.params.lr: -0.1 must be >= 0"),
    (params(lr="0.1"), "synthesis.params.lr: '0.1' must be a number"),
    (params(iterations=0), "synthesis.params.iterations: 0 must be >= 1"),
    (params(iterations=2.5), "synthesis.params.iterations: 2.5 must be an integer"),
    (params(iterations=True), "synthesis.params.iterations: True must be an integer"),
    (params(betas=[0.5, 1.0]), "synthesis.params.betas[1]: 1.0 must be in [0, 1)"),
    (params(betas=[-0.1, 0.9]), "synthesis.params.betas[0]: -0.1 must be in [0, 1)"),
    (params(betas=[0.5]), "synthesis.params.betas: [0.5] must have 2 values, not 1"),
    (params(betas=0.5), "synthesis.params.betas: 0.5 must be a list of 2 numbers"),
    (params(eps=0), "synthesis.params.eps: 0 must be > 0"),
    (params(eps=float("nan")), "synthesis.params.eps: nan must be a finite number"),
    (params(alpha=-1), "synthesis.params.alpha: -1 must be >= 0"),
    (params(ridge=0.0), "synthesis.params.ridge: 0.0 must be > 0"),
    (params(min_crop_scale=0), "synthesis.params.min_crop_scale: 0 must be in (0, 1]"),
    (params(min_crop_scale=1.5), "synthesis.params.min_crop_scale: 1.5 must be in (0, 1]"),
    (params(curriculum_end=0), "synthesis.params.curriculum_end: 0 must be in (0, 1]"),
    ({"dataset": {"mean": [0.1], "std": [0.2, 0.3]}}, "dataset.mean has 1 values, dataset.std 2"),
    ({"dataset": {"mean": [0.1], "std": [0.0]}}, "dataset.std: [0.0] must all be > 0"),
    ({"dataset": {"mean": ["a"], "std": [1.0]}}, "dataset.mean.0: 'a' must be a number"),
    ({"dataset": {"mean": [0.1]}}, "dataset.mean and dataset.std are declared together"),
    (
        {"dataset": {"mean": [0.1] * 3, "std": [0.3] * 3, "channels": 1}},
        "dataset.mean: 3 values for dataset.channels: 1",
    ),
    (params(mean=[0.1] * 3), "synthesis.params.mean: the normalisation is the data's"),
    ({"dataset": {"kind": "mnist5k", "channels": 3}}, "dataset.channels: 3 for the mnist5k"),
    ({"model": {"arch": "no_such_net"}}, "model.arch: unknown architecture 'no_such_net'"),
    ({"labels": {"params": {"epochs": 3}}}, "labels.params.epochs: set labels.epochs instead"),
    ({"labels": {"params": {"flip": 1}}}, "labels.params.flip"),
    ({"validation": {"params": {"lr": -1.0}}}, "validation.params.lr: -1.0 must be > 0"),
    (params(flip="yes"), "synthesis.params.flip: 'yes' must be true or false"),
    (params(loss="kl-diag"), "synthesis.params.loss: 'kl-diag' is not one of"),
    # teachers.train (TeacherTrain, storage/recipes.py)
    (train(lr=-0.1), "teachers.train.lr: -0.1 must be > 0"),
    (train(lr=0), "teachers.train.lr: 0 must be > 0"),
    (train(lr="fast"), "teachers.train.lr: 'fast' must be a number"),
    (train(epochs=0), "teachers.train.epochs: 0 must be >= 1"),
    (train(epochs="3"), "teachers.train.epochs: '3' must be an integer"),
    (train(batch_size=0), "teachers.train.batch_size: 0 must be >= 1"),
    (train(weight_decay=-1e-4), "teachers.train.weight_decay: -0.0001 must be >= 0"),
    (train(label_smoothing=1.0), "teachers.train.label_smoothing: 1.0 must be in [0, 1)"),
    (train(momentum=1.0), "teachers.train.momentum: 1.0 must be in [0, 1)"),
    (train(gamma=0), "teachers.train.gamma: 0 must be in (0, 1]"),
    (train(warmup_epochs=-1), "teachers.train.warmup_epochs: -1 must be >= 0"),
    (train(step_every_epochs=0), "teachers.train.step_every_epochs: 0 must be >= 1"),
    (train(min_crop_scale=0), "teachers.train.min_crop_scale: 0 must be in (0, 1]"),
    (train(optimizer="adam"), "teachers.train.optimizer: 'adam' is not one of"),
    # the pydantic sections
    ({"dataset": {"synthetic_size": 0}}, "dataset.synthetic_size: 0 must be >= 1"),
    ({"dataset": {"test_fraction": 0}}, "dataset.test_fraction: 0 must be > 0"),
    ({"dataset": {"test_fraction": 1.0}}, "dataset.test_fraction: 1.0 must be < 1"),
    ({"teachers": {"count": 0}}, "teachers.count: 0 must be >= 1"),
    ({"stats": {"batch_size": 0}}, "stats.batch_size: 0 must be >= 1"),
    ({"stats": {"workers": -1}}, "stats.workers: -1 must be >= 0"),
    ({"synthesis": {"ipc": 0}}, "synthesis.ipc: 0 must be >= 1"),
    ({"synthesis": {"batch_size": "200"}}, "synthesis.batch_size: '200' must be an integer"),
    ({"labels": {"epochs": 0}}, "labels.epochs: 0 must be >= 1"),
    ({"labels": {"epochs": 30.0}}, "labels.epochs: 30.0 must be an integer"),
    ({"labels": {"topk": 0}}, "labels.topk: 0 must be >= 1"),
    ({"labels": {"format": "topk", "topk": 11}}, "labels.topk: 11 must be <= the 10 classes"),
    ({"validation": {"epochs": 0}}, "validation.epochs: 0 must be >= 1"),
    ({"validation": {"students": 0}}, "validation.students: 0 must be >= 1"),
    ({"dask": {"workers": 0}}, "dask.workers: 0 must be >= 1"),
    ({"distributed": {"timeout_min": 0}}, "distributed.timeout_min: 0 must be > 0"),
    ({"distributed": {"timeout_min": float("inf")}}, "timeout_min: inf must be a finite number"),
    ({"seed": -1}, "seed: -1 must be >= 0"),
    ({"seed": "1"}, "seed: '1' must be an integer"),
]


@pytest.mark.parametrize("bad,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_a_bad_value_is_refused_naming_its_key(bad, message):
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        parse_config({"preset": "demo-mnist", **bad}, "my.json")
    assert str(e.value).startswith("my.json: ")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_the_recipe_sections_type_every_field_of_the_recipes(preset):
    """The recipe dataclasses check nothing (d3s_core is maths): their typed sections here
    name every field (or where it is set instead), and the presets' own recipes pass them."""
    p = PRESETS[preset]
    recipes = {
        ("teachers", "train"): p.teacher,
        ("synthesis", "params"): p.synthesis,
        ("labels", "params"): p.labels,
        ("validation", "params"): p.student,
    }
    assert set(recipes) == set(RECIPES)
    for key, recipe in recipes.items():
        section = RECIPES[key]
        names = {f.name for f in dataclasses.fields(recipe)}
        assert names == set(section.model_fields) | set(section.ELSEWHERE), key
        given = {k: v for k, v in dataclasses.asdict(recipe).items() if k in section.model_fields}
        assert section.model_validate(given).over(recipe) == recipe


def test_an_override_in_the_saved_config_is_only_what_was_given():
    cfg = parse_config({"synthesis": {"params": {"betas": [0.5, 0.8], "iterations": 7}}})
    assert cfg.model_dump(mode="json")["synthesis"]["params"] == {
        "betas": [0.5, 0.8],
        "iterations": 7,
    }
    assert cfg.synthesis_cfg().betas == (0.5, 0.8)
    assert cfg.model_dump(mode="json")["teachers"]["train"] == {}


def test_a_zero_synthesis_lr_keeps_the_initial_images_and_is_allowed():
    # configs/study-mnist.json's "init-real-unchanged" variant: the real init images, unchanged
    cfg = parse_config({"synthesis": {"init": "real", "params": {"lr": 0.0, "iterations": 1}}})
    assert cfg.synthesis_cfg().lr == 0.0


# -- point 4: the first artifact fixes the configuration ------------------------------------


def test_a_failed_start_does_not_fix_the_configuration(tmp_path):
    train_dir = make_tree(tmp_path / "train")
    val_dir = make_tree(tmp_path / "val", per_class=1)
    root = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_teachers(root, folder_config(tmp_path / "nope", tmp_path / "nope"))
    first = json.loads((root / "config.json").read_text())

    good = folder_config(train_dir, val_dir)
    run_teachers(root, good)  # the corrected configuration replaces the failed one
    saved = json.loads((root / "config.json").read_text())
    assert saved["config_hash"] == good.config_hash() != first["config_hash"]
    assert saved["run_id"] != first["run_id"]  # a new run: nothing of the old one is reused
    assert (root / "teachers" / "teacher_0.safetensors").exists()

    # Now a teacher artifact exists: another configuration is refused, naming what differs
    # (in both directions of the dotted keys, values saved vs given) ...
    changed = parse_config(
        {
            **json.loads((root / "config.json").read_text())["config"],
            "teachers": {"count": 1, "train": {"epochs": 2}},
            "labels": {"epochs": 5},
            "dask": {"workers": 3},
        }
    )
    with pytest.raises(ValueError) as e:
        open_run(root, changed)
    msg = str(e.value)
    assert "different configuration: teachers.train.epochs: 1 (saved) vs 2 (given); " in msg
    assert "labels.epochs: 30 vs 5; use a new root or the saved configuration" in msg
    assert "dask" not in msg and "storage" not in msg and "distributed" not in msg
    assert json.loads((root / "config.json").read_text()) == saved
    # ... while a section outside the hash (where the work runs) may change.
    with open_run(root, good.model_copy(update={"distributed": DistributedSpec(ranks=2)})):
        pass


def test_only_bookkeeping_files_leave_the_configuration_open(tmp_path):
    fs = RunFS(tmp_path)
    a = parse_config({"seed": 1})
    b = parse_config({"seed": 2, "synthesis": {"params": {"iterations": 400}}})
    with open_run(tmp_path, a):
        pass
    fs.write_bytes(MANIFEST, json.dumps({"version": 1, "artifacts": {}}).encode())
    (tmp_path / "teachers").mkdir()  # an empty folder is not an artifact
    (tmp_path / "teachers" / ".tmp-abc123").write_bytes(b"half")  # a killed writer's temporary
    save_config(fs, b)
    assert json.loads(fs.read_bytes("config.json"))["config_hash"] == b.config_hash()

    fs.write_bytes("teachers/checkpoints/teacher_0/state.json", b"{}")  # a stage wrote this
    with pytest.raises(ValueError) as e:
        save_config(fs, a)
    assert str(e.value).endswith(
        "different configuration: seed: 2 (saved) vs 1 (given); synthesis.params.iterations: "
        "400 vs (default); use a new root or the saved configuration"
    )


def test_teacher_epochs_follow_the_presets_step_count_unless_set():
    """On a tree of 1,437 images, demo-mnist's 4 epochs x 32 batches of 128 (its 4,000 images)
    become ceil(128 / 12) = 11 epochs of 12 batches; a value the config sets always wins."""
    from storage.profile import describe_recipe

    folder = {"kind": "imagefolder", "path": "/t", "val_path": "/v"}
    cfg = parse_config({"preset": "demo-mnist", "dataset": folder})
    assert cfg.teacher_train().epochs == 4  # the data's size unknown: the preset's
    assert cfg.teacher_train(4000).epochs == 4  # the preset's own size
    assert cfg.teacher_train(1437).epochs == 11
    assert cfg.teacher_train(100_000).epochs == 1
    # At most 10x the preset's epochs: ImageNet-21K's schedule on 4,000 digits would be 216,020.
    big = parse_config({"preset": "imagenet-21k", "dataset": folder})
    assert big.teacher_train(4000).epochs == 10 * big.preset_obj().teacher.epochs
    assert "capped at 10x the preset's epochs" in describe_recipe(big, 4000)
    assert cfg.recipe_sources(1437)["teachers.train.epochs"] == (11, "data")
    assert "set by the data's size: teachers.train.epochs = 11" in describe_recipe(cfg, 1437)
    for over in (
        {"teachers": {"train": {"epochs": 4}}},
        {"dataset": {"kind": "synthetic"}},
    ):
        fixed = parse_config({"preset": "demo-mnist", "dataset": folder, **over})
        assert fixed.teacher_train(1437).epochs == 4
        assert "data's size" not in describe_recipe(fixed, 1437)
    # At the run's batch size: 64 per batch, 23 batches per epoch, ceil(128 / 23) = 6.
    batch = parse_config(
        {"preset": "demo-mnist", "dataset": folder, "teachers": {"train": {"batch_size": 64}}}
    )
    assert batch.teacher_train(1437).epochs == 6
