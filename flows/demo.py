"""`make demo`: D3S end to end on the real MNIST-5k digits, on CPU, in one process.

This is the core algorithm run in memory (issue 2). The Prefect flow, on-disk artifacts, resume
and the report land with the storage and pipeline issues; until then this script is what
`make demo` runs, and it says so.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from d3s_core.isu import RunningStats
from d3s_core.labelling import label_epoch
from d3s_core.layers import FeatureHooks, default_measured_layers
from d3s_core.loss import prepare_target
from d3s_core.models import build_model, freeze
from d3s_core.optim import make_optimizer, make_scheduler
from d3s_core.presets import Preset, get_preset
from d3s_core.stats import SuffStats
from d3s_core.students import epoch_schedule, evaluate_top1, train_student_epoch
from d3s_core.synthesis import MeasuredTeacher, finish_batch, init_state, run_iterations
from d3s_core.teachers import TeacherTrainer
from storage.datasets import load_mnist5k, stratified_split


def normalise(images: torch.Tensor, p: Preset) -> torch.Tensor:
    mean = torch.tensor(p.mean).view(1, -1, 1, 1)
    std = torch.tensor(p.std).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean) / std


def new_model(p: Preset, arch: str | None = None) -> torch.nn.Module:
    return build_model(
        arch or p.arch, p.num_classes, in_chans=p.in_chans, low_res=p.low_res, width=p.width
    )


def train_teachers(p: Preset, x: torch.Tensor, y: torch.Tensor, seed: int) -> list[torch.nn.Module]:
    steps = -(-len(x) // p.teacher.batch_size)
    teachers = []
    for m in range(p.teachers):
        torch.manual_seed(seed + m)
        trainer = TeacherTrainer(new_model(p), p.teacher, steps, seed=seed + m)
        for _ in range(p.teacher.epochs):
            loss = trainer.train_epoch(trainer.shuffled_batches(x, y))
        print(f"  teacher {m}: {p.teacher.epochs} epochs, final train loss {loss:.3f}")
        teachers.append(freeze(trainer.model))
    return teachers


def full_dataset_stats(
    model: torch.nn.Module, x: torch.Tensor, batch: int = 500
) -> MeasuredTeacher:
    names = default_measured_layers(model)
    acc: list[SuffStats] = []
    with FeatureHooks(model, names) as hooks, torch.no_grad():
        for i in range(0, len(x), batch):
            model(x[i : i + batch])
            parts = [SuffStats.from_batch(a) for a in hooks.outputs]
            acc = parts if not acc else [a.merge(b) for a, b in zip(acc, parts, strict=True)]
    return MeasuredTeacher(model, names, [prepare_target(*s.mean_cov()) for s in acc])


def synthesize(
    p: Preset, measured: list[MeasuredTeacher], seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    classes = torch.arange(p.num_classes).repeat(p.ipc)  # every batch sees every class
    running = RunningStats.zeros([t.channels for t in measured])
    images = []
    for b, labels in enumerate(classes.split(p.synthesis_batch), start=1):
        state = init_state(b, labels, (p.in_chans, p.image_size, p.image_size), seed=seed + b)
        state, hist = run_iterations(state, measured, running, p.synthesis)
        running = finish_batch(state, measured, running, p.synthesis)
        print(
            f"  batch {b}: teacher {hist[-1].teacher}, loss {float(hist[0].loss):.1f} -> "
            f"{float(hist[-1].loss):.1f}, CE {float(hist[-1].ce):.3f}"
        )
        images.append(state.images)
    return torch.cat(images), classes


def train_students(p: Preset, images, epochs, x_test, y_test, seed: int) -> list[float]:
    accs = []
    steps = len(epochs[0].batches()) * p.student.epochs
    for s in range(p.student.students):
        torch.manual_seed(seed + s)
        student = new_model(p, p.student.arch)
        opt = make_optimizer(
            student.parameters(),
            p.student.optimizer,
            p.student.lr,  # type: ignore[arg-type]
            p.student.weight_decay,
            p.student.momentum,
        )
        sched = make_scheduler(opt, p.student.schedule, steps)  # type: ignore[arg-type]
        order = epoch_schedule(
            len(epochs), p.student.epochs, torch.Generator().manual_seed(seed + s)
        )
        for e in order:
            train_student_epoch(student, opt, images, epochs[e], p.student.temperature, sched)
        accs.append(evaluate_top1(student, x_test, y_test))
        print(f"  student {s}: {p.student.epochs} epochs, test top-1 {100 * accs[-1]:.1f}%")
    return accs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    p = get_preset("demo-mnist")
    t0 = time.time()
    print(
        "D3S demo on MNIST-5k (real digits), CPU, in memory. The Prefect flow, artifacts and "
        "resume arrive with the next issues."
    )
    raw, classes = load_mnist5k()
    tr, te = stratified_split(classes, 0.2, seed=args.seed)
    x, y = normalise(raw[tr], p), classes[tr]
    x_test, y_test = normalise(raw[te], p), classes[te]
    print(f"[1/5] {p.teachers} teachers ({p.arch}, width {p.width}) on {len(x)} digits")
    teachers = train_teachers(p, x, y, args.seed)
    t_acc = [evaluate_top1(t, x_test, y_test) for t in teachers]
    print(f"  teacher test top-1: {', '.join(f'{100 * a:.1f}%' for a in t_acc)}")
    print("[2/5] full-dataset statistics, 17 layers per teacher")
    measured = [full_dataset_stats(t, x) for t in teachers]
    print(
        f"[3/5] synthesis: IPC {p.ipc}, K = {p.synthesis.iterations}, ISU {p.synthesis.isu}, "
        f"ENS {p.synthesis.teacher_choice}"
    )
    images, _ = synthesize(p, measured, args.seed)
    print(f"[4/5] ensemble labels: {p.labels.epochs} epochs")
    epochs = [
        label_epoch(
            images,
            teachers,
            e,
            args.seed,
            p.labels.batch_size,
            (p.labels.min_crop_scale, 1.0),
            p.labels.flip,
        )
        for e in range(p.labels.epochs)
    ]
    print(
        f"[5/5] {p.student.students} students, {p.student.epochs} epochs, "
        f"T = {p.student.temperature}"
    )
    accs = train_students(p, images, epochs, x_test, y_test, args.seed)
    sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
    print(
        f"\nteachers: {100 * statistics.mean(t_acc):.1f}% mean top-1 "
        f"on {len(x_test)} held-out digits"
    )
    print(
        f"students on {len(images)} distilled images: {100 * statistics.mean(accs):.1f} "
        f"+- {100 * sd:.1f}% top-1 (n = {len(accs)})"
    )
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
