"""Corruption is detected and named, a second writer is refused, bad config is rejected."""

import json
import multiprocessing as mp
import shutil

import pytest
import torch

from storage.config import RunConfig, parse_config
from storage.fs import RunFS
from storage.lock import RunLock, RunLocked
from storage.manifest import CorruptArtifact
from storage.run import SYN_IMAGES, labels_epoch, open_run, teacher_weights
from storage.states import load_state, save_state
from tasks.stages import STAGES

from .configs import SMALL


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    torch.set_num_threads(1)
    with open_run(root, parse_config(SMALL)) as run:
        for fn in STAGES.values():
            fn(run)
    return root


def run_stage(root, stage):
    with open_run(root, parse_config(SMALL)) as run:
        STAGES[stage](run)


def copy_run(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_truncated_parquet_shard_is_detected(finished_run, tmp_path):
    root = copy_run(finished_run, tmp_path)
    shard = root / labels_epoch(1)
    shard.write_bytes(shard.read_bytes()[:-100])  # a write killed before the footer
    with (
        open_run(root, parse_config(SMALL)) as run,
        pytest.raises(CorruptArtifact, match="epoch=1"),
    ):
        STAGES["labels"](run)


def test_corrupted_zarr_chunk_is_detected(finished_run, tmp_path):
    root = copy_run(finished_run, tmp_path)
    chunk = next(p for p in (root / SYN_IMAGES / "images" / "c").rglob("*") if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with (
        open_run(root, parse_config(SMALL)) as run,
        pytest.raises(CorruptArtifact, match="images.zarr"),
    ):
        STAGES["labels"](run)


def test_missing_teacher_file_is_detected(finished_run, tmp_path):
    root = copy_run(finished_run, tmp_path)
    (root / teacher_weights(1)).unlink()
    with (
        open_run(root, parse_config(SMALL)) as run,
        pytest.raises(CorruptArtifact, match="teacher_1"),
    ):
        STAGES["stats"](run)


def test_damaged_checkpoint_is_detected(tmp_path):
    fs = RunFS(tmp_path)
    save_state(fs, "ckpt/state", {"x": torch.arange(10)})
    (blob,) = (tmp_path / "ckpt").glob("state.*.safetensors")
    data = bytearray(blob.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte in the tensor data
    blob.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifact, match=r"state\.[0-9a-f]{16}\.safetensors: checksum"):
        load_state(fs, "ckpt/state")


def test_overwriting_a_state_keeps_the_old_one_until_the_new_marker(tmp_path):
    fs = RunFS(tmp_path)
    save_state(fs, "ckpt/state", {"epoch": 1, "w": torch.zeros(3)})
    old = next((tmp_path / "ckpt").glob("state.*.safetensors")).name
    save_state(fs, "ckpt/state", {"epoch": 2, "w": torch.ones(3)})
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert old not in files and len(files) == 2  # new tensors + marker; old tensors gone
    state, _ = load_state(fs, "ckpt/state")
    assert state["epoch"] == 2 and torch.equal(state["w"], torch.ones(3))


def _hold_lock(root, ready, release):
    lock = RunLock(RunFS(root)).acquire()
    ready.set()
    release.wait(30)
    lock.release()


def test_second_writer_is_refused_and_lock_dies_with_its_process(tmp_path):
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    proc.start()
    assert ready.wait(60)
    with pytest.raises(RunLocked, match="another process"):
        open_run(tmp_path, RunConfig())
    proc.kill()  # SIGKILL: the kernel drops the flock
    proc.join()
    with open_run(tmp_path, RunConfig()):
        pass


def test_a_run_cannot_change_configuration(tmp_path):
    with open_run(tmp_path, RunConfig()) as run:
        run.fs.write_bytes("teachers/teacher_0.json", b"{}")
        run.manifest.record("teachers/teacher_0.json", "teachers")
    with pytest.raises(ValueError, match=r"different configuration: seed: 0 \(saved\) vs 1"):
        open_run(tmp_path, RunConfig(seed=1))


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"synthesis": {"ipcc": 10}}, "synthesis.ipcc"),
        ({"bogus": 1}, "bogus"),
        ({"synthesis": {"params": {"lrr": 0.1}}}, "lrr"),
        ({"preset": "imagenet-2k"}, "imagenet-2k"),
        ({"labels": {"format": "bf8"}}, "labels.format"),
        ({"teachers": {"count": 0}}, "teachers.count"),
    ],
)
def test_bad_config_names_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_config(bad, "my.json")


def test_config_hash_is_stable_and_saved(tmp_path):
    cfg = parse_config(SMALL)
    with open_run(tmp_path, cfg):
        pass
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["config_hash"] == cfg.config_hash() == parse_config(saved["config"]).config_hash()


def test_real_image_initialisation_draws_training_images_of_each_class():
    from types import SimpleNamespace

    from storage.datasets import NormalisedImages, synthetic_images
    from tasks.stages.common import class_rows
    from tasks.stages.synthesis import _init_images

    images, classes = synthetic_images(40, 4, 1, 8, seed=0)
    train = NormalisedImages(images, classes, (0.5,), (0.5,))
    run = SimpleNamespace(
        config=SimpleNamespace(
            seed=0,
            synthesis=SimpleNamespace(init="real"),
            preset_obj=lambda: SimpleNamespace(num_classes=4),
        ),
        _recipe=SimpleNamespace(num_classes=4),  # tasks.stages.profile.recipe's cache
    )
    pools = class_rows(run, train)
    labels = torch.tensor([0, 1, 2, 3, 1])
    x = _init_images(run, train, pools, labels, b=1)
    pool, pool_classes = train.tensors()
    for img, c in zip(x, labels.tolist(), strict=True):
        matches = [(img == p).all() for p in pool]
        assert any(matches) and pool_classes[matches.index(True)] == c
    assert torch.equal(x, _init_images(run, train, pools, labels, b=1))  # seeded
    run.config.synthesis.init = "noise"
    assert _init_images(run, train, pools, labels, b=1) is None
