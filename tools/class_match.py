"""Class-conditional match and within-class spread of a study's image sets (an investigation
tool; the study report has the class-agnostic match, `report/match/`).

For each teacher of the study's `shared/` run and each image set (every variant with images of
its own, and the random real subset):

- class-conditional KL: Eq. 1 of the set's images of class c against the Gaussians of the
  training images of class c, at the last `--layers` measured layers, summed over layers, mean
  over classes. With IPC images per class this has a large finite-sample floor; compare with
  the random real subset's value.
- within-class spread: trace of the covariance of the teacher's globally pooled features at the
  last measured layer over the set's images of class c, divided by the same over the training
  images of class c, mean over classes (1: as varied as the data; < 1: more prototypical).

Needs an in-memory dataset (mnist5k, synthetic): it holds the whole training set.

    env -u PREFECT_API_URL .venv/bin/python tools/class_match.py runs/study-mnist
"""

from __future__ import annotations

import argparse
import json

import torch

from d3s_core.layers import FeatureHooks
from d3s_core.loss import kl_layers, prepare_target
from d3s_core.stats import SuffStats
from storage.arrays import read_images, read_teacher_stats
from storage.config import load_config
from storage.fs import RunFS
from storage.manifest import Manifest
from storage.run import BASELINE, Run, images_of
from storage.study import StudySpec, plan_study
from tasks.stages.common import class_of_each, data_splits, load_teacher
from tasks.stages.stats import STATS


def _features(model, layers, x):
    with FeatureHooks(model, layers) as hooks, torch.no_grad():
        model(x)
        acts = [a.clone() for a in hooks.outputs]
    return acts, acts[-1].mean((2, 3)).double()


def _spread(pooled: torch.Tensor) -> float:
    return float(torch.cov(pooled.T).trace())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", help="study root")
    ap.add_argument("--config", default="configs/study-mnist.json", help="the study config")
    ap.add_argument("--layers", type=int, default=4, help="last N measured layers")
    args = ap.parse_args()
    plan = plan_study(StudySpec.model_validate(json.load(open(args.config))))
    shared = RunFS(f"{args.root}/shared")
    run = Run(shared, load_config(shared), Manifest(shared))
    train, _, _ = data_splits(run)
    y_train = class_of_each(train)
    x_train = torch.stack([train[i][0] for i in range(len(train))])
    classes = sorted(set(y_train.tolist()))
    sets = {}
    for c in plan.cells:
        if c.images_from is None:
            fs = RunFS(f"{args.root}/{c.root}")
            rel = images_of(BASELINE if c.kind == "random-real" else "")
            if Manifest(fs).is_recorded(rel):  # skip runs not synthesised yet
                Manifest(fs).verify(rel)
                x, y = read_images(fs, rel)
                sets[c.name] = (x, y.long())
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name in sets}
    for m in range(run.config.teachers.count):
        model = load_teacher(run, m)
        layers = read_teacher_stats(shared, STATS, m)["layers"][-args.layers :]
        acts, pooled = _features(model, layers, x_train)
        targets, spread = {}, {}
        for c in classes:
            sel = y_train == c
            targets[c] = [
                prepare_target(*SuffStats.from_batch(a[sel], "float64").mean_cov(), 1e-4)
                for a in acts
            ]
            spread[c] = _spread(pooled[sel])
        for name, (x, y) in sets.items():
            a_set, p_set = _features(model, layers, x)
            kls, ratios = [], []
            for c in classes:
                sel = y == c
                mc = [SuffStats.from_batch(a[sel], "float64").mean_cov() for a in a_set]
                kl = kl_layers([u for u, _ in mc], [s for _, s in mc], targets[c], 1e-4)
                kls.append(float(kl.sum()))
                ratios.append(_spread(p_set[sel]) / spread[c])
            rows[name].append((sum(kls) / len(kls), sum(ratios) / len(ratios)))
    teachers = range(run.config.teachers.count)
    print(
        "| images | "
        + " | ".join(f"class KL, teacher {m}" for m in teachers)
        + " | "
        + " | ".join(f"within-class spread, teacher {m}" for m in teachers)
        + " |"
    )
    print("|---|" + "---|" * (2 * len(teachers)))
    for name, r in rows.items():
        print(
            f"| {name} | "
            + " | ".join(f"{k:.1f}" for k, _ in r)
            + " | "
            + " | ".join(f"{s:.2f}" for _, s in r)
            + " |"
        )


if __name__ == "__main__":
    main()
