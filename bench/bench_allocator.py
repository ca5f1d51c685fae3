"""What a stage process pays for its allocator: a teacher epoch, a synthesis interval and a
student epoch, each in a process that has imported every stage (as `d3s run`, the demo, the
tests and every worker do) against the same work under glibc's default policy.

Each side is a fresh `python` process (an allocator policy, once set, lasts for the process):

- default: imports d3s_core only: glibc's own policy;
- stage:   imports every stage module (tasks.stages.*, flows.distill) first: whatever they do
           at import, the process keeps; the student epoch's batches go through the
           heap-trimming wrapper the validation stage uses (tasks/stages/common.trimmed);
- fixed:   as `stage`, then the policy the stages used to set at import (mallopt
           M_MMAP_THRESHOLD = 128 KiB, process-wide), to show what this bench sees when a
           stage module changes the allocator.

Work, on the CPU, each repeated in every process on the same seeds, each after one untimed
warm-up step (a long run is in its steady state): a teacher epoch (ResNet-18, 100 classes,
`--steps` steps of batch 64 at 64 px with TeacherTrainer's crops, cross-entropy and SGD), a
synthesis interval (`run_iterations` of `--iterations` D3S iterations on a batch of 50 images,
2 teachers, 17 measured layers, ISU) and a student epoch (`train_student_batches`: `--steps`
knowledge-distillation steps of batch 64). The sides run
in turn, `--rounds` times (order rotated each round); per work item the table shows the median
seconds of each side, the ratios to `default` and the process's system time and minor page
faults. Goal: stage / default <= 1.05 for each.

    .venv/bin/python bench/bench_allocator.py
    .venv/bin/python bench/bench_allocator.py --rounds 3 --steps 15 --iterations 20
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIDES = ("default", "stage", "fixed")
WORK = ("teacher epoch", "synthesis interval", "student epoch")
GOAL = 1.05


def _usage() -> tuple[float, int]:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_stime, u.ru_minflt


def worker(side: str, steps: int, iterations: int, threads: int) -> dict:
    if side != "default":
        import flows.distill  # noqa: F401
        import tasks.stages  # noqa: F401
        import tasks.stages.baseline  # noqa: F401
        import tasks.stages.coreset  # noqa: F401
        import tasks.stages.labels  # noqa: F401
        import tasks.stages.synthesis  # noqa: F401
        import tasks.stages.validation  # noqa: F401
    if side == "fixed":
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD, the old policy
    import torch

    from d3s_core.isu import RunningStats
    from d3s_core.labelling import EpochLabels
    from d3s_core.layers import FeatureHooks, default_measured_layers
    from d3s_core.loss import prepare_target
    from d3s_core.models import build_model
    from d3s_core.presets import TINY_IMAGENET
    from d3s_core.stats import SuffStats
    from d3s_core.students import train_student_batches
    from d3s_core.synthesis import MeasuredTeacher, SynthesisConfig, init_state, run_iterations
    from d3s_core.teachers import TeacherTrainer

    torch.set_num_threads(threads)
    classes, size, batch = 100, 64, 64
    out: dict = {}

    def timed(name: str, fn) -> None:
        s0, f0 = _usage()
        t0 = time.perf_counter()
        fn()
        s1, f1 = _usage()
        out[name] = {"s": time.perf_counter() - t0, "sys": s1 - s0, "faults": f1 - f0}

    g = torch.Generator().manual_seed(0)
    data = [
        (
            torch.randn(batch, 3, size, size, generator=g),
            torch.randint(0, classes, (batch,), generator=g),
        )
        for _ in range(steps)
    ]

    torch.manual_seed(0)
    teacher = build_model("resnet18", classes, low_res=False)
    trainer = TeacherTrainer(teacher, TINY_IMAGENET.teacher, steps, seed=0)
    trainer.train_epoch(data[:1])  # warm-up (first-touch of the process's memory), untimed
    timed("teacher epoch", lambda: trainer.train_epoch(data))  # the teachers stage: no trim

    def measured(seed: int) -> MeasuredTeacher:
        torch.manual_seed(seed)
        model = build_model("resnet18", classes, low_res=False).eval()
        names = default_measured_layers(model)
        x = torch.randn(128, 3, size, size, generator=torch.Generator().manual_seed(seed))
        with FeatureHooks(model, names) as hooks, torch.no_grad():
            model(x)
            stats = [SuffStats.from_batch(a, "float64").mean_cov() for a in hooks.outputs]
        return MeasuredTeacher(model, names, [prepare_target(m, c) for m, c in stats])

    teachers = [measured(1), measured(2)]
    cfg = SynthesisConfig(iterations=iterations, lr=0.1)
    state = init_state(1, torch.arange(50) % classes, (3, size, size), seed=0)
    running = RunningStats.zeros([t.channels for t in teachers])
    warm = init_state(1, torch.arange(50) % classes, (3, size, size), seed=1)
    run_iterations(warm, teachers, running, SynthesisConfig(iterations=1, lr=0.1))  # warm-up
    timed("synthesis interval", lambda: run_iterations(state, teachers, running, cfg))

    torch.manual_seed(3)
    student = build_model("resnet18", classes, low_res=False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    labelled = []
    for b, (x, _) in enumerate(data):
        boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(batch, 1)
        labels = EpochLabels(
            epoch=0,
            batch=torch.full((batch,), b),
            position=torch.arange(batch),
            image_index=torch.arange(b * batch, (b + 1) * batch),
            boxes=boxes,
            flips=torch.zeros(batch, dtype=torch.bool),
            logits=torch.randn(batch, classes, generator=g),
        )
        labelled.append((x, labels))
    train_student_batches(student, opt, labelled[:1])  # warm-up, untimed
    if side == "default":
        timed("student epoch", lambda: train_student_batches(student, opt, labelled))
    else:  # as the validation stage feeds it: its batches through the heap-trimming wrapper
        from tasks.stages.common import trimmed

        timed("student epoch", lambda: train_student_batches(student, opt, trimmed(labelled)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=15, help="training steps per epoch")
    ap.add_argument("--iterations", type=int, default=20, help="synthesis iterations")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.iterations, args.threads)))
        return
    sides = args.sides.split(",")
    got: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(args.rounds):
        order = sides[r % len(sides) :] + sides[: r % len(sides)]
        for side in order:
            cmd = [sys.executable, __file__, "--worker", side, "--steps", str(args.steps)]
            cmd += ["--iterations", str(args.iterations), "--threads", str(args.threads)]
            done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{side} worker failed:\n{done.stderr[-3000:]}")
            got[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds}: {side} done", file=sys.stderr, flush=True)
    print(
        f"{args.rounds} rounds, {args.steps} steps per epoch, {args.iterations} synthesis "
        f"iterations, {args.threads} threads; seconds are medians over the rounds"
    )
    print(
        "| work | "
        + " | ".join(f"{s} s" for s in sides)
        + " | "
        + " | ".join(f"{s}/default" for s in sides if s != "default")
        + " | "
        + " | ".join(f"{s} sys s / faults" for s in sides)
        + " |"
    )
    print("|" + "---|" * (1 + 2 * len(sides) + len(sides) - 1))
    worst = 0.0
    for w in WORK:
        med = {s: statistics.median(x[w]["s"] for x in got[s]) for s in sides}
        sys_t = {s: statistics.median(x[w]["sys"] for x in got[s]) for s in sides}
        faults = {s: int(statistics.median(x[w]["faults"] for x in got[s])) for s in sides}
        ratios = {s: med[s] / med["default"] for s in sides if s != "default"}
        if "stage" in ratios:
            worst = max(worst, ratios["stage"])
        print(
            f"| {w} | "
            + " | ".join(f"{med[s]:.2f}" for s in sides)
            + " | "
            + " | ".join(f"{r:.3f}" for r in ratios.values())
            + " | "
            + " | ".join(f"{sys_t[s]:.2f} / {faults[s]:,}" for s in sides)
            + " |"
        )
    if "stage" in sides and "default" in sides:
        verdict = "within" if worst <= GOAL else "OVER"
        print(f"worst stage/default: {worst:.3f} ({verdict} the {GOAL} goal)")


if __name__ == "__main__":
    main()
