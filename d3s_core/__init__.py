"""D3S maths: pure PyTorch, tensors in and tensors out.

No file I/O, no Prefect, no printing. Paper references are to Loo, Maalouf et al.,
"Large Scale Dataset Distillation with Domain Shift" (ICML 2024).

The public API is every name in a submodule's `__all__`, also reachable from the package
(`from d3s_core import kl_layers`), imported on first use: `import d3s_core` alone imports
no submodule (and no torch). Names with a leading underscore are private to their module.
"""

from __future__ import annotations

import importlib
from typing import Any

SUBMODULES = (
    "augment",
    "coresets",
    "dataprofile",
    "diagnostics",
    "distributed",
    "isu",
    "labelling",
    "layers",
    "loss",
    "models",
    "optim",
    "precision",
    "presets",
    "scores",
    "stats",
    "students",
    "synthesis",
    "teachers",
)

# name -> submodule, from each submodule's __all__ (tests/test_public_api.py keeps it in step)
_OWNER = {
    "BOX_LEVELS": "augment",
    "LOG_RATIO": "augment",
    "apply_crops": "augment",
    "box_codes": "augment",
    "boxes_from_codes": "augment",
    "curriculum_scale": "augment",
    "draw_crops": "augment",
    "pixel_bounds": "augment",
    "quantise_boxes": "augment",
    "herding": "coresets",
    "k_center_greedy": "coresets",
    "penultimate_features": "coresets",
    "CROP_RATIO_IMAGENET": "dataprofile",
    "GREY_MODES": "dataprofile",
    "HeaderSummary": "dataprofile",
    "PixelMoments": "dataprofile",
    "infer_channels": "dataprofile",
    "infer_size": "dataprofile",
    "profile_rows": "dataprofile",
    "SetMatch": "diagnostics",
    "set_match": "diagnostics",
    "World": "distributed",
    "gather_rows": "distributed",
    "label_loss_across": "distributed",
    "moments_across": "distributed",
    "sum_across": "distributed",
    "RunningStats": "isu",
    "isu_mix": "isu",
    "isu_weight": "isu",
    "teacher_for_batch": "isu",
    "EpochLabels": "labelling",
    "batch_rows": "labelling",
    "derive_seed": "labelling",
    "ensemble_logits": "labelling",
    "epoch_batches": "labelling",
    "label_batches": "labelling",
    "label_epoch": "labelling",
    "FeatureHooks": "layers",
    "default_measured_layers": "layers",
    "select_layers": "layers",
    "DEFAULT_RIDGE": "loss",
    "GaussianTarget": "loss",
    "TargetGroup": "loss",
    "cholesky_with_ridge": "loss",
    "diagonal_kl_layers": "loss",
    "gaussian_kl": "loss",
    "kl_layers": "loss",
    "kl_layers_unchecked": "loss",
    "label_loss": "loss",
    "moment_matching_layers": "loss",
    "prepare_target": "loss",
    "stack_targets": "loss",
    "SmallResNet": "models",
    "TORCHVISION_RESNETS": "models",
    "build_model": "models",
    "check_arch": "models",
    "freeze": "models",
    "lr_factor": "optim",
    "make_optimizer": "optim",
    "make_scheduler": "optim",
    "CompiledForward": "precision",
    "autocast_off": "precision",
    "enable_cudnn_autotune": "precision",
    "network_autocast": "precision",
    "to_channels_last": "precision",
    "DEMO_MNIST": "presets",
    "DataShape": "presets",
    "IMAGENET_1K": "presets",
    "IMAGENET_21K": "presets",
    "LabelConfig": "presets",
    "MNIST_MEAN": "presets",
    "MNIST_STD": "presets",
    "PRESETS": "presets",
    "Preset": "presets",
    "SCALE_21K": "presets",
    "StudentConfig": "presets",
    "TINY_IMAGENET": "presets",
    "fit_to_data": "presets",
    "get_preset": "presets",
    "Moments": "stats",
    "SuffStats": "stats",
    "T": "stats",
    "as_samples": "stats",
    "at_least_float32": "stats",
    "batch_moments": "stats",
    "centred_gram": "stats",
    "merge_all": "stats",
    "merge_tree": "stats",
    "moments_grad": "stats",
    "round_to_tf32": "stats",
    "epoch_schedule": "students",
    "evaluate_top1": "students",
    "kd_loss": "students",
    "train_hard_batches": "students",
    "train_student_batches": "students",
    "train_student_epoch": "students",
    "DTYPES": "synthesis",
    "IMAGENET_MEAN": "synthesis",
    "IMAGENET_STD": "synthesis",
    "MeasuredTeacher": "synthesis",
    "RidgeLog": "synthesis",
    "StepMetrics": "synthesis",
    "SynthesisConfig": "synthesis",
    "SynthesisState": "synthesis",
    "adam_update": "synthesis",
    "cosine_lr": "synthesis",
    "finish_batch": "synthesis",
    "gather_state": "synthesis",
    "init_state": "synthesis",
    "run_iterations": "synthesis",
    "shard_state": "synthesis",
    "synthesis_loss": "synthesis",
    "LRS_LAMBDA": "scores",
    "Spread": "scores",
    "hard_label_recovery": "scores",
    "improvement_over_random": "scores",
    "label_robust_score": "scores",
    "paired_scores": "scores",
    "TeacherState": "teachers",
    "TeacherTrainConfig": "teachers",
    "TeacherTrainer": "teachers",
}

__all__ = sorted(_OWNER)


def __getattr__(name: str) -> Any:
    if name in _OWNER:
        value = getattr(importlib.import_module(f".{_OWNER[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(SUBMODULES))
