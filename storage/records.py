"""The small JSON records a run writes, owned here like every other on-disk format: where each
lives, how it is written (atomically, by RunFS.write_bytes) and read (errors name the file).

- teacher metadata `teachers/teacher_{m}.json` (docs/artifacts.md, "teachers/");
- synthesis commit records `synthesis/batches/batch_{b:06d}.json` (one per committed batch);
- the grid's index `synthesis/png/grid.json`;
- student metrics `validation/<arch>-seed{s}/metrics.json` and the summary
  `validation/summary.json` (with the baseline's under `baselines/random-real/`);
- the set-to-data match `report/match.json`; the study's `study.json`.

Stages pass dicts in and get dicts back; the manifest records (and verifies) what it covers.
"""

from __future__ import annotations

import json
from typing import Any

from .fs import RunFS
from .layout import SYN_IMAGES, student_dir, summary_of, syn_commit, teacher_meta
from .manifest import REMEDY, CorruptArtifact, Manifest, content_sha256

BATCHES = "synthesis/batches"
GRID_META = "synthesis/png/grid.json"
MATCH = "report/match.json"


def write_record(fs: RunFS, rel: str, record: dict[str, Any], indent: int | None = 1) -> None:
    """One JSON record, atomically (all of it or the previous version)."""
    fs.write_bytes(rel, json.dumps(record, indent=indent).encode())


def read_recorded(fs: RunFS, rel: str) -> dict[str, Any]:
    """A record the manifest covers (teacher metadata, student metrics, summaries), checked
    against its checksum first where it is recorded (a few KB: a changed digit in a metric is
    refused, naming the file, not reported)."""
    manifest = Manifest(fs)
    if manifest.is_recorded(rel):
        manifest.verify(rel)
    return read_record(fs, rel)


def read_record(fs: RunFS, rel: str) -> dict[str, Any]:
    """One JSON record; a file that is not a JSON object is an error naming it."""
    try:
        record = json.loads(fs.read_bytes(rel))
    except ValueError as e:
        raise CorruptArtifact(f"{fs.url(rel)}: not JSON ({e})") from None
    if not isinstance(record, dict):
        raise CorruptArtifact(f"{fs.url(rel)}: not a JSON object")
    return record


# -- teachers -------------------------------------------------------------------------------
def write_teacher_meta(fs: RunFS, m: int, meta: dict[str, Any]) -> str:
    write_record(fs, teacher_meta(m), meta)
    return teacher_meta(m)


def read_teacher_meta(fs: RunFS, m: int) -> dict[str, Any]:
    return read_recorded(fs, teacher_meta(m))


def read_teacher_metas(fs: RunFS, count: int) -> list[dict[str, Any]]:
    return [read_teacher_meta(fs, m) for m in range(count)]


# -- synthesis ------------------------------------------------------------------------------
# A commit record is not in the manifest (the images store is, once every batch is committed):
# it carries the SHA-256 of its own content, so a changed byte that still parses is found too.
RECORD_SHA = "record_sha256"


def write_batch_record(fs: RunFS, b: int, record: dict[str, Any]) -> str:
    write_record(fs, syn_commit(b), {**record, RECORD_SHA: content_sha256(record, RECORD_SHA)})
    return syn_commit(b)


def read_batch_record(fs: RunFS, b: int) -> dict[str, Any]:
    """Batch b's commit record; CorruptArtifact (of the images store, which repair redoes from
    this batch on) when it is not JSON or not the bytes it was written as."""
    return _checked_record(fs, syn_commit(b))


def _checked_record(fs: RunFS, rel: str) -> dict[str, Any]:
    try:
        record = read_record(fs, rel)
    except CorruptArtifact as e:
        raise CorruptArtifact(f"{e}; {REMEDY.format(root=fs.url())}", SYN_IMAGES) from None
    if RECORD_SHA in record and record[RECORD_SHA] != content_sha256(record, RECORD_SHA):
        raise CorruptArtifact(
            f"{fs.url(rel)}: a synthesis commit record whose content does not match its own "
            f"checksum; {REMEDY.format(root=fs.url())}",
            SYN_IMAGES,
        )
    return record


def batch_records(fs: RunFS) -> list[dict[str, Any]]:
    """Every committed batch's record, in batch order."""
    names = sorted(n for n in fs.listdir(BATCHES) if n.endswith(".json"))
    return [_checked_record(fs, f"{BATCHES}/{n}") for n in names]


def committed_batches(fs: RunFS) -> int:
    """How many batch records exist (reads the listing only)."""
    return len([n for n in fs.listdir(BATCHES) if n.endswith(".json")])


def write_grid_meta(fs: RunFS, meta: dict[str, Any]) -> None:
    write_record(fs, GRID_META, meta, indent=None)


# -- validation -----------------------------------------------------------------------------
def student_metrics_path(arch: str, seed: int, prefix: str = "", protocol: str = "soft") -> str:
    return f"{student_dir(arch, seed, prefix, protocol)}/metrics.json"


def write_student_metrics(
    fs: RunFS,
    arch: str,
    seed: int,
    metrics: dict[str, Any],
    prefix: str = "",
    protocol: str = "soft",
) -> str:
    rel = student_metrics_path(arch, seed, prefix, protocol)
    write_record(fs, rel, metrics)
    return rel


def read_student_metrics(
    fs: RunFS, arch: str, seed: int, prefix: str = "", protocol: str = "soft"
) -> dict[str, Any]:
    return read_recorded(fs, student_metrics_path(arch, seed, prefix, protocol))


def student_metrics(
    fs: RunFS, arch: str, seeds: int, prefix: str = "", protocol: str = "soft"
) -> list[dict[str, Any]]:
    """The metrics of the students that finished (of seeds 0..seeds-1)."""
    return [
        read_student_metrics(fs, arch, s, prefix, protocol)
        for s in range(seeds)
        if fs.exists(student_metrics_path(arch, s, prefix, protocol))
    ]


def write_summary(
    fs: RunFS, summary: dict[str, Any], prefix: str = "", protocol: str = "soft"
) -> str:
    write_record(fs, summary_of(prefix, protocol), summary)
    return summary_of(prefix, protocol)


def read_summary(fs: RunFS, prefix: str = "", protocol: str = "soft") -> dict[str, Any] | None:
    """The validation summary of `protocol` under `prefix`, or None where there is none."""
    rel = summary_of(prefix, protocol)
    return read_recorded(fs, rel) if fs.exists(rel) else None


# -- report ---------------------------------------------------------------------------------
def write_match(fs: RunFS, match: dict[str, Any]) -> None:
    write_record(fs, MATCH, match)


def read_match(fs: RunFS) -> dict[str, Any] | None:
    return read_record(fs, MATCH) if fs.exists(MATCH) else None
