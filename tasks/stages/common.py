"""What every stage needs: the preset, the data, the teachers, progress callbacks."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load as st_load

from d3s_core.models import build_model, freeze
from d3s_core.presets import Preset
from storage.datasets import NormalisedImages, open_splits
from storage.run import Run, teacher_meta, teacher_weights
from storage.states import weights_blob

Progress = Callable[[str, float, dict[str, Any]], None]


def no_progress(stage: str, fraction: float, info: dict[str, Any]) -> None:
    """Progress callback signature: stage name, fraction done in [0, 1], details."""


def new_model(p: Preset, arch: str | None = None) -> torch.nn.Module:
    return build_model(
        arch or p.arch, p.num_classes, in_chans=p.in_chans, low_res=p.low_res, width=p.width
    )


def data_splits(run: Run) -> tuple[NormalisedImages, NormalisedImages, str]:
    """(train, held-out, dataset fingerprint) of the run's dataset."""
    cfg, p = run.config, run.config.preset_obj()
    ds = cfg.dataset
    return open_splits(
        ds.kind,
        p.num_classes,
        p.in_chans,
        p.image_size,
        p.mean,
        p.std,
        seed=cfg.seed,
        test_fraction=ds.test_fraction,
        synthetic_size=ds.synthetic_size,
    )


def save_teacher(run: Run, m: int, model: torch.nn.Module, meta: dict[str, Any]) -> None:
    """Weights (safetensors), then metadata; both recorded in the manifest."""
    run.fs.write_bytes(teacher_weights(m), weights_blob(model.state_dict()))
    run.fs.write_bytes(teacher_meta(m), json.dumps(meta, indent=1).encode())
    run.manifest.record(teacher_weights(m), "teachers")
    run.manifest.record(teacher_meta(m), "teachers")


def load_teachers(run: Run) -> list[torch.nn.Module]:
    """The run's M teachers, verified against the manifest, frozen, on the run's device."""
    p = run.config.preset_obj()
    out = []
    for m in range(run.config.teachers.count):
        run.manifest.verify(teacher_weights(m))
        run.manifest.verify(teacher_meta(m))
        meta = json.loads(run.fs.read_bytes(teacher_meta(m)))
        if meta["num_classes"] != p.num_classes:
            raise ValueError(
                f"{run.fs.url(teacher_meta(m))}: teacher has {meta['num_classes']} "
                f"classes, the dataset {p.num_classes}"
            )
        model = new_model(p, meta["arch"])
        model.load_state_dict(st_load(run.fs.read_bytes(teacher_weights(m))))
        out.append(freeze(model.to(run.config.device)))
    return out
