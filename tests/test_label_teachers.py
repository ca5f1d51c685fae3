"""labels.teachers: "ensemble" labels with the mean of all teachers' logits, "single" with
teacher 0 alone; the default keeps the config hash of runs from before the switch."""

import pytest
import torch

from d3s_core.labelling import label_epoch
from storage.config import parse_config
from storage.labels import read_epoch
from storage.run import labels_epoch, open_run
from tasks.stages import open_data
from tasks.stages.labels import write_one_epoch

from .configs import SMALL
from .helpers import tiny_teacher


@pytest.mark.parametrize("which", ["ensemble", "single"])
def test_single_teacher_labels_use_teacher_zero(tmp_path, which):
    cfg = parse_config({**SMALL, "labels": {**SMALL["labels"], "teachers": which}})
    teachers = [tiny_teacher(10, in_chans=1, seed=s).eval() for s in range(2)]
    images = torch.randn(10, 1, 28, 28)
    with open_run(tmp_path, cfg) as run:
        open_data(run)
        write_one_epoch(run, images, teachers, 1)
        got = read_epoch(run.fs, labels_epoch(1), 1)
    lc = cfg.labels
    pl = cfg.preset_obj().labels
    scale = (pl.min_crop_scale, 1.0)
    one = label_epoch(images, teachers[:1], 1, cfg.seed, lc.batch_size, scale, pl.flip)
    both = label_epoch(images, teachers, 1, cfg.seed, lc.batch_size, scale, pl.flip)
    want, other = (both, one) if which == "ensemble" else (one, both)
    assert torch.equal(got.image_index, want.image_index) and torch.equal(got.boxes, want.boxes)
    assert torch.allclose(got.logits, want.logits)
    assert not torch.allclose(got.logits, other.logits)


def test_the_labelling_teachers_are_part_of_the_config_hash():
    ensemble = parse_config({**SMALL, "labels": {**SMALL["labels"], "teachers": "ensemble"}})
    single = parse_config({**SMALL, "labels": {**SMALL["labels"], "teachers": "single"}})
    assert ensemble.config_hash() == parse_config(SMALL).config_hash()  # the default
    assert single.config_hash() != ensemble.config_hash()
