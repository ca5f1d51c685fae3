"""A run: its root, configuration, manifest and writer lock, and the layout of its artifacts.

See docs/artifacts.md for every file's schema.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .config import RunConfig, save_config
from .fs import RunFS
from .lock import RunLock
from .manifest import Manifest


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


def labels_epoch(e: int) -> str:
    return f"labels/epoch={e}/part-0.parquet"


def student_dir(arch: str, seed: int) -> str:
    return f"validation/{arch.replace(':', '_')}-seed{seed}"


@dataclass
class Run:
    fs: RunFS
    config: RunConfig
    manifest: Manifest
    lock: RunLock | None = None

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_run(root: str | os.PathLike[str], config: RunConfig, **storage_options: Any) -> Run:
    """Open (or create) a run for writing: take the lock, then save or check the config."""
    fs = RunFS(root, **storage_options)
    lock = RunLock(fs).acquire()
    try:
        fs.sweep_temporaries()
        save_config(fs, config)
    except BaseException:
        lock.release()
        raise
    return Run(fs, config, Manifest(fs), lock)
