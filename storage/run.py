"""A run: its root, configuration, manifest and writer lock; the layout of its artifacts
(storage/layout.py, re-exported here).

See docs/artifacts.md for every file's schema.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

from .config import (
    RunConfig,
    config_differences,
    describe_differences,
    load_config,
    save_config,
)
from .fs import RunFS
from .layout import (
    BASELINE,
    BASELINE_KINDS,
    FULL_DATA,
    STATS,
    SYN_CHECKPOINT,
    SYN_IMAGES,
    baseline_prefix,
    images_of,
    labels_epoch,
    student_dir,
    summary_of,
    syn_commit,
    syn_isu,
    teacher_checkpoint,
    teacher_meta,
    teacher_weights,
    validation_dir,
)
from .lock import RunLock
from .manifest import Manifest
from .records import read_record, read_summary, read_teacher_metas

# The Run, and the layout of its artifacts (storage/layout.py) re-exported: callers take the
# paths from here with the Run.
__all__ = [
    "Run",
    "attach_run",
    "open_run",
    "read_results",
    "BASELINE",
    "BASELINE_KINDS",
    "FULL_DATA",
    "STATS",
    "SYN_CHECKPOINT",
    "SYN_IMAGES",
    "baseline_prefix",
    "images_of",
    "labels_epoch",
    "student_dir",
    "summary_of",
    "syn_commit",
    "syn_isu",
    "teacher_checkpoint",
    "teacher_meta",
    "teacher_weights",
    "validation_dir",
]

# Locks this process holds, by run URL, with a count of the Runs using each: a flow and the
# tasks it runs in threads share one lock (a second flock from the same process would fail).
_HELD: dict[str, tuple[RunLock, int]] = {}
_HELD_GUARD = threading.Lock()


def _take_lock(fs: RunFS) -> RunLock:
    with _HELD_GUARD:
        lock, count = _HELD.get(fs.url(), (None, 0))
        if lock is None:
            lock = RunLock(fs).acquire()
            fs.sweep_temporaries()
        _HELD[fs.url()] = (lock, count + 1)
        return lock


def _drop_lock(fs: RunFS) -> None:
    with _HELD_GUARD:
        lock, count = _HELD[fs.url()]
        if count == 1:
            del _HELD[fs.url()]
            lock.release()
        else:
            _HELD[fs.url()] = (lock, count - 1)


def read_results(fs: RunFS, teachers: int) -> dict[str, Any]:
    """A finished run's accuracies: {"teachers": [teacher metadata], "summary": the distilled
    set's validation summary (soft protocol; hard where the run validates only that),
    "baseline": the random-real baseline's summary (same protocol) or None}."""
    protocol = "soft" if fs.exists(summary_of()) else "hard"
    return {
        "teachers": read_teacher_metas(fs, teachers),
        "summary": read_record(fs, summary_of("", protocol)),
        "baseline": read_summary(fs, BASELINE, protocol),
    }


@dataclass
class Run:
    fs: RunFS
    config: RunConfig
    manifest: Manifest
    lock: RunLock | None = None

    def close(self) -> None:
        if self.lock is not None:
            _drop_lock(self.fs)
            self.lock = None

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_run(root: str | os.PathLike[str], config: RunConfig, **storage_options: Any) -> Run:
    """Open (or create) a run for writing: take the lock, then save or check the config."""
    fs = RunFS(root, **storage_options)
    lock = _take_lock(fs)
    try:
        save_config(fs, config)
    except BaseException:
        _drop_lock(fs)
        raise
    return Run(fs, config, Manifest(fs, lock.check, config.config_hash()), lock)


def attach_run(root: str | os.PathLike[str], config: RunConfig, **storage_options: Any) -> Run:
    """Open, without the lock, a run that another process of the same job is writing (the
    writer rank of a data-parallel stage, which took the lock with `open_run` first). The
    caller only reads through it; the saved configuration must be this one."""
    fs = RunFS(root, **storage_options)
    saved = load_config(fs)
    if saved.config_hash() != config.config_hash():
        raise ValueError(
            f"{fs.url()}: this run was started with a different configuration: "
            + describe_differences(config_differences(saved, config))
        )
    return Run(fs, config, Manifest(fs))
