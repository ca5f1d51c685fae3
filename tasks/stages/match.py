"""How well image sets match the run's full-dataset statistics (d3s_core/diagnostics.py), per
teacher: Eq. 1 of the whole set per layer, and the teacher's top-1 and confidence on it. Read
only: the run's teachers and statistics must be finished."""

from __future__ import annotations

from typing import Any

from d3s_core.diagnostics import set_match
from d3s_core.synthesis import MeasuredTeacher
from storage.arrays import image_chunks
from storage.fs import RunFS
from storage.manifest import Manifest
from storage.records import read_match, write_match
from storage.run import BASELINE, Run, baseline_prefix, images_of

from .common import data_splits, load_teachers
from .stats import load_targets


def match_images(run: Run, images: RunFS, rel: str) -> dict[str, Any]:
    """The match of the image set at `rel` of the run root `images` (an images.zarr, verified
    against that root's manifest) with every teacher of `run`, streamed in chunks. Returns plain
    numbers: per teacher the KL per layer and its sum, top-1, confidence; their means over
    teachers; the images' manifest checksum."""
    ridge = run.config.synthesis_cfg().ridge
    _, _, fingerprint = data_splits(run)
    device = run.config.device
    checksum = Manifest(images).verify(rel)
    teachers = []
    for m, model in enumerate(load_teachers(run)):
        layers, targets = load_targets(run, m, ridge, fingerprint)
        teachers.append(MeasuredTeacher(model, layers, targets))
    chunks = ((x.to(device), y) for x, y in image_chunks(images, rel))
    results = set_match(teachers, chunks, ridge)
    per_teacher: list[dict[str, Any]] = [
        {
            "kl": float(r.kl.sum()),
            "kl_per_layer": [float(k) for k in r.kl],
            "top1": r.top1,
            "confidence": r.confidence,
        }
        for r in results
    ]
    n = len(per_teacher)
    return {
        "images": results[0].images,
        "images_sha256": checksum,
        "teachers": per_teacher,
        "kl": sum(t["kl"] for t in per_teacher) / n,
        "top1": sum(t["top1"] for t in per_teacher) / n,
        "confidence": sum(t["confidence"] for t in per_teacher) / n,
    }


def match_unless_known(
    run: Run, images: RunFS, rel: str, known: dict[str, Any] | None
) -> dict[str, Any]:
    """`known` (an earlier `match_images` result) if it was measured on the images now recorded
    at `rel` of `images` (same manifest checksum: nothing is read), else measured again."""
    if known is not None and known.get("images_sha256") == Manifest(images).checksum(rel):
        return known
    return match_images(run, images, rel)


SETS = (
    ("distilled", ""),
    ("random_real", BASELINE),
    ("herding", baseline_prefix("herding")),
    ("k_center", baseline_prefix("k-center")),
)


def match_run(run: Run) -> dict[str, Any]:
    """The match of the run's distilled set and of each baseline image set it has,
    kept in report/match.json with each set's manifest checksum: measured again only when the
    images change (nothing is read when they have not). Needs the run's teachers and
    statistics."""
    known = read_match(run.fs) or {}
    out = {}
    for name, prefix in SETS:
        rel = images_of(prefix)
        if not run.manifest.is_recorded(rel):
            continue
        out[name] = match_unless_known(run, run.fs, rel, known.get(name))
    write_match(run.fs, out)
    return out
