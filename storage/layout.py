"""Where each artifact of a run lives: run-relative paths, the same for local and remote roots.

See docs/artifacts.md for every file's schema. storage/run.py re-exports these names (most
callers take them from there with the Run).
"""

from __future__ import annotations


def teacher_weights(m: int) -> str:
    return f"teachers/teacher_{m}.safetensors"


def teacher_meta(m: int) -> str:
    return f"teachers/teacher_{m}.json"


def teacher_checkpoint(m: int) -> str:
    return f"teachers/checkpoints/teacher_{m}"


STATS = "stats.zarr"
SYN_IMAGES = "synthesis/images.zarr"
SYN_CHECKPOINT = "synthesis/checkpoint/state"


def syn_commit(b: int) -> str:
    return f"synthesis/batches/batch_{b:06d}.json"


def syn_isu(b: int) -> str:
    return f"synthesis/isu/after_batch_{b:06d}"


# The baselines (a seeded random subset of real training images, coreset selections of real
# images, the full training set) live under baselines/<kind>/ with the distilled set's layout:
# images.zarr, labels/, validation/ (soft protocol), validation-hard/ (hard protocol).
BASELINE_KINDS = ("random-real", "herding", "k-center", "full-data")


def baseline_prefix(kind: str) -> str:
    if kind not in BASELINE_KINDS:
        raise ValueError(f"unknown baseline {kind!r}; expected one of {BASELINE_KINDS}")
    return f"baselines/{kind}/"


BASELINE = baseline_prefix("random-real")
FULL_DATA = baseline_prefix("full-data")  # students only (validation-hard/): no image store


def images_of(prefix: str = "") -> str:
    return f"{prefix}images.zarr" if prefix else SYN_IMAGES


def labels_epoch(e: int, prefix: str = "") -> str:
    return f"{prefix}labels/epoch={e}/part-0.parquet"


def validation_dir(prefix: str = "", protocol: str = "soft") -> str:
    """Where an image set's students of one protocol live: `validation` (soft, the paper's
    knowledge distillation) or `validation-hard` (class labels, cross-entropy)."""
    if protocol not in ("soft", "hard"):
        raise ValueError(f"unknown protocol {protocol!r}; expected 'soft' or 'hard'")
    return f"{prefix}validation" if protocol == "soft" else f"{prefix}validation-hard"


def student_dir(arch: str, seed: int, prefix: str = "", protocol: str = "soft") -> str:
    return f"{validation_dir(prefix, protocol)}/{arch.replace(':', '_')}-seed{seed}"


def summary_of(prefix: str = "", protocol: str = "soft") -> str:
    return f"{validation_dir(prefix, protocol)}/summary.json"
