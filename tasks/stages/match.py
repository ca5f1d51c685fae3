"""How well image sets match the run's full-dataset statistics (d3s_core/diagnostics.py), per
teacher: Eq. 1 of the whole set per layer, and the teacher's top-1 and confidence on it. Read
only: the run's teachers and statistics must be finished."""

from __future__ import annotations

import json
from typing import Any

import torch

from d3s_core.diagnostics import set_match
from d3s_core.synthesis import MeasuredTeacher
from storage.arrays import read_images
from storage.run import BASELINE, Run, images_of

from .common import data_splits, load_teachers
from .stats import load_targets
from .synthesis import images_sha256


def match_images(run: Run, images: torch.Tensor, classes: torch.Tensor) -> dict[str, Any]:
    """The match of `images` (N, C, H, W) normalised, with `classes` (N,), to every teacher of
    `run`. Returns plain numbers: per teacher the KL per layer and its sum, top-1, confidence;
    and their means over teachers."""
    ridge = run.config.synthesis_cfg().ridge
    _, _, fingerprint = data_splits(run)
    device = run.config.device
    per_teacher = []
    for m, model in enumerate(load_teachers(run)):
        layers, targets = load_targets(run, m, ridge, fingerprint)
        r = set_match(
            MeasuredTeacher(model, layers, targets), images.to(device), classes, ridge=ridge
        )
        per_teacher.append(
            {
                "kl": float(r.kl.sum()),
                "kl_per_layer": [float(k) for k in r.kl],
                "top1": r.top1,
                "confidence": r.confidence,
            }
        )
    n = len(per_teacher)
    return {
        "images": len(images),
        "images_sha256": images_sha256(images),
        "teachers": per_teacher,
        "kl": sum(t["kl"] for t in per_teacher) / n,
        "top1": sum(t["top1"] for t in per_teacher) / n,
        "confidence": sum(t["confidence"] for t in per_teacher) / n,
    }


MATCH = "report/match.json"
SETS = (("distilled", ""), ("random_real", BASELINE))


def match_run(run: Run) -> dict[str, Any]:
    """The match of the run's distilled set and, if the run has one, its random real subset,
    kept in report/match.json with each set's image hash: measured again only when the images
    change. Needs the run's teachers and statistics."""
    known = json.loads(run.fs.read_bytes(MATCH)) if run.fs.exists(MATCH) else {}
    out = {}
    for name, prefix in SETS:
        rel = images_of(prefix)
        if not run.manifest.is_recorded(rel):
            continue
        run.manifest.verify(rel)
        images, classes = read_images(run.fs, rel)
        if known.get(name, {}).get("images_sha256") == images_sha256(images):
            out[name] = known[name]
        else:
            out[name] = match_images(run, images, classes)
    run.fs.write_bytes(MATCH, json.dumps(out, indent=1).encode())
    return out
