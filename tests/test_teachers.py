import copy

import torch

from d3s_core.optim import lr_factor
from d3s_core.presets import PRESETS, get_preset
from d3s_core.students import evaluate_top1
from d3s_core.teachers import TeacherTrainConfig, TeacherTrainer

from .helpers import tiny_teacher

CFG = TeacherTrainConfig(
    optimizer="sgd",
    lr=0.1,
    batch_size=16,
    epochs=4,
    schedule="cosine",
    warmup_epochs=1,
    min_crop_scale=0.8,
    flip=False,
)


def toy_data(n=64):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 4
    x = torch.randn(n, 3, 12, 12, generator=g) * 0.3
    for i, q in enumerate(y.tolist()):  # class = which quadrant is bright
        x[i, :, (q // 2) * 6 : (q // 2) * 6 + 6, (q % 2) * 6 : (q % 2) * 6 + 6] += 2.0
    return x, y


def trainer(seed=0):
    return TeacherTrainer(tiny_teacher(seed=seed), CFG, steps_per_epoch=4, seed=seed)


def test_teacher_training_resume_is_bit_exact():
    x, y = toy_data()
    a = trainer()
    for _ in range(CFG.epochs):
        a.train_epoch(a.shuffled_batches(x, y))
    b = trainer()
    for _ in range(2):
        b.train_epoch(b.shuffled_batches(x, y))
    saved = copy.deepcopy(b.state())
    c = trainer(seed=0)
    c.load(saved)
    assert c.epoch == 2
    for _ in range(2):
        c.train_epoch(c.shuffled_batches(x, y))
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, c.model.state_dict()[k]), k
    assert evaluate_top1(c.model, x, y) > 0.5


def test_schedules():
    assert lr_factor("cosine", 0, 100, warmup_steps=10) == 0.1
    assert lr_factor("cosine", 10, 100, warmup_steps=10) == 1.0
    assert abs(lr_factor("cosine", 99, 100)) < 1e-3
    assert (
        lr_factor("step", 59, 90, step_every=30) == 0.1
        and lr_factor("step", 60, 90, step_every=30) == 0.1**2
    )
    assert lr_factor("onecycle", 29, 100) == 1.0


def test_presets_carry_the_papers_tables():
    p = get_preset("imagenet-1k")
    assert (p.synthesis.lr, p.synthesis.iterations, p.synthesis.betas, p.synthesis.alpha) == (
        0.25,
        1000,
        (0.5, 0.9),
        20.0,
    )
    assert (p.teacher.optimizer, p.teacher.lr, p.teacher.epochs, p.teacher.schedule) == (
        "sgd",
        0.1,
        90,
        "step",
    )
    assert (p.student.optimizer, p.student.lr, p.student.batch_size, p.student.epochs) == (
        "adamw",
        1e-3,
        128,
        300,
    )
    t = get_preset("tiny-imagenet")
    assert (
        t.low_res
        and t.synthesis.iterations == 4000
        and t.synthesis.lr == 0.4
        and t.student.optimizer == "sgd"
    )
    assert (
        get_preset("imagenet-21k").synthesis.lr == 0.05
        and get_preset("imagenet-21k").num_classes == 10450
    )
    assert all(
        p.synthesis.alpha == 20.0 and p.student.temperature == 20.0 for p in PRESETS.values()
    )
    assert not get_preset("demo-mnist").synthesis.flip
