"""The run's recipe, read from its data profile: what every stage uses (tasks/stages/profile.py
writes the profile in the data stage, the first of every run)."""

from __future__ import annotations

import math
from typing import Any

from d3s_core.presets import DataShape, Preset
from d3s_core.teachers import TeacherTrainConfig
from storage.profile import PROFILE, describe_profile, describe_recipe, read_profile
from storage.run import Run


def recipe(run: Run) -> Preset:
    """The run's recipe fitted to its data: the preset's hyperparameters with the config's
    overrides (model, teachers, synthesis, labels, students) and the data profile's shape and
    normalisation. Made once per Run object."""
    cached = run.__dict__.get("_recipe")
    if cached is not None:
        return cached
    cfg, v = run.config, data_profile(run)["values"]
    shape = DataShape(
        num_classes=int(v["num_classes"]),
        in_chans=int(v["channels"]),
        image_size=int(v["image_size"]),
        mean=tuple(v["mean"]),
        std=tuple(v["std"]),
        crop_ratio=float(v["crop_ratio"]),
    )
    r = cfg.fitted(shape)
    run.__dict__["_recipe"] = r
    return r


def data_profile(run: Run) -> dict[str, Any]:
    """The run's data profile, read from `dataset/profile.json` (written by the data stage,
    `open_data`, which every run starts with)."""
    cached = run.__dict__.get("_profile")
    if cached is not None:
        return cached
    profile = read_profile(run.fs)
    if profile is None:
        raise ValueError(
            f"{run.fs.url(PROFILE)}: no data profile yet; the data stage writes it first "
            f"(`d3s run`, or `d3s data CONFIG --root {run.fs.url()}`)"
        )
    run.__dict__["_profile"] = profile
    return profile


def provenance_lines(run: Run) -> list[str]:
    """What the run took from the data, the config and the preset, one line each (for the
    start of a run, `d3s status` and the report)."""
    profile = data_profile(run)
    return describe_profile(profile) + [describe_recipe(run.config, profile["train_images"])]


def teacher_recipe(run: Run) -> TeacherTrainConfig:
    """The teachers' recipe on this run's data (its epochs may follow the data's size:
    RunConfig.teacher_epochs_for)."""
    return run.config.teacher_train(data_profile(run)["train_images"])


def teacher_warnings(metas: list[dict[str, Any]], num_classes: int) -> list[str]:
    """Teachers that ended far from converged: the last epoch still removed more than 10 % of
    the training loss, or the final training loss is above half of chance's ln(K)."""
    out = []
    chance = math.log(num_classes) if num_classes > 1 else 1.0
    for m, meta in enumerate(metas):
        losses = meta.get("train_loss") or []
        if len(losses) >= 2 and losses[-1] < 0.9 * losses[-2]:
            out.append(
                f"teacher {m + 1}: the last epoch lowered the training loss by "
                f"{100 * (1 - losses[-1] / losses[-2]):.0f} % ({losses[-2]:.3f} -> "
                f"{losses[-1]:.3f}): far from converged; raise teachers.train.epochs"
            )
        elif losses and losses[-1] > 0.5 * chance:
            out.append(
                f"teacher {m + 1}: final training loss {losses[-1]:.3f} is above "
                f"{0.5 * chance:.3f}, half of chance's ln({num_classes}) = {chance:.3f}: far "
                "from converged; raise teachers.train.epochs"
            )
    return out
