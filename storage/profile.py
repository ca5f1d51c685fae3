"""`dataset/profile.json`: what a run took from its data and what from its config or preset
(class count, channels, image size and resize rule, normalisation mean/std), with how each was
found, the inspected images' modes and sizes, and warnings where the recipe looks off for the
data. Written once, atomically, by the process holding the run's lock (the first stage that
opens the data); read by every later stage, worker and rank, `d3s status` and the report.
It carries the SHA-256 of its own content; a damaged one is measured again by the data stage
(the data and the config determine it), with a warning naming it.
Schema: docs/artifacts.md, "dataset/"."""

from __future__ import annotations

import json
from typing import Any

from .fs import RunFS
from .manifest import CorruptArtifact, content_sha256

PROFILE = "dataset/profile.json"
SCHEMA_VERSION = 1
VALUES = ("num_classes", "channels", "image_size", "crop_ratio", "mean", "std")


def write_profile(fs: RunFS, profile: dict[str, Any]) -> dict[str, Any]:
    """Write the profile atomically; returns it as `read_profile` will read it."""
    check_profile(profile, fs.url(PROFILE))
    body = {"schema_version": SCHEMA_VERSION, **profile}
    body.pop(SELF_SHA, None)
    body[SELF_SHA] = content_sha256(body)
    fs.write_bytes(PROFILE, json.dumps(body, indent=1, sort_keys=True).encode())
    return body


SELF_SHA = "self_sha256"  # the SHA-256 of the rest: a changed byte that still parses is found


def read_profile(fs: RunFS) -> dict[str, Any] | None:
    """The run's data profile, or None where none is written yet."""
    if not fs.exists(PROFILE):
        return None
    where = fs.url(PROFILE)
    try:
        profile = json.loads(fs.read_bytes(PROFILE))
    except ValueError as e:
        raise CorruptArtifact(f"{where}: not JSON ({e})") from None
    if not isinstance(profile, dict) or profile.get("schema_version") != SCHEMA_VERSION:
        raise CorruptArtifact(f"{where}: not a schema {SCHEMA_VERSION} data profile")
    if SELF_SHA in profile and profile[SELF_SHA] != content_sha256(profile, SELF_SHA):
        raise CorruptArtifact(f"{where}: its content does not match its own checksum")
    check_profile(profile, where)
    return profile


def check_profile(profile: dict[str, Any], where: str) -> None:
    values, sources = profile.get("values"), profile.get("sources")
    if not isinstance(values, dict) or not isinstance(sources, dict):
        raise CorruptArtifact(f"{where}: lacks 'values' or 'sources'")
    missing = [k for k in VALUES if k not in values or k not in sources]
    if missing:
        raise CorruptArtifact(f"{where}: lacks {missing}")


def _show(x: Any) -> str:
    if isinstance(x, list):
        return "(" + ", ".join(f"{y:.4f}" for y in x) + ")"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def describe_profile(profile: dict[str, Any]) -> list[str]:
    """One line per value: `channels = 3  [data: colour images among the 120 inspected ...]`."""
    v, src = profile["values"], profile["sources"]
    return [f"{k} = {_show(v[k])}  [{src[k]}]" for k in VALUES]


def describe_recipe(cfg: Any, train_images: int | None = None) -> str:
    """`recipe: preset 'tiny-imagenet', overridden by the config: model.width = 4; ...; set by
    the data's size: teachers.train.epochs = 16 (...)`, on `train_images` training images."""
    sources = cfg.recipe_sources(train_images)
    changed = [f"{k} = {val}" for k, (val, f) in sources.items() if f == "config"]
    out = f"recipe: preset {cfg.preset!r}" + (
        f", overridden by the config: {'; '.join(changed)}" if changed else ", as it is"
    )
    if sources.get("teachers.train.epochs", (None, ""))[1] == "data":
        p, epochs = cfg.preset_obj(), sources["teachers.train.epochs"][0]
        steps = p.teacher.epochs * -(-p.train_images // p.teacher.batch_size)
        scale = cfg.MAX_EPOCH_SCALE
        capped = epochs == scale * p.teacher.epochs
        out += (
            f"; set by the data's size: teachers.train.epochs = {epochs}, the preset's {steps:,} "
            f"optimizer steps ({p.teacher.epochs} epochs over its {p.train_images:,} images) on "
            f"these {train_images:,} training images"
            + (f", capped at {scale}x the preset's epochs" if capped else "")
            + " (teachers.train.epochs, if set, wins)"
        )
    return out
