"""Checking a run's artifacts against its manifest, and forgetting damaged ones.

Two depths of check:

- **quick** (`check(..., quick=True)`): each artifact's files are listed and stat'ed, and the
  result (file count, bytes, latest modification time) is compared with the fingerprint the
  manifest recorded when the artifact was finished. Equal: the artifact is taken as intact
  without reading it. Different (a write, a truncation, a copy, a restore from backup) or no
  fingerprint recorded (an older run): the artifact is hashed in full and compared with its
  recorded SHA-256. This is what every `d3s run` does before any stage: at ImageNet-21K shape it
  stats about a thousand files, instead of reading 600 GB of labels and images. It cannot see
  damage that leaves size and modification time as they were (bit rot under the file system):
  `d3s verify ROOT` hashes everything.
- **full** (`quick=False`): every artifact hashed.

`repair` forgets damaged or missing artifacts and every artifact computed from them, and
deletes their files, so that the next run recomputes exactly that. A damaged distilled-image
store keeps its intact leading batches: only the first batch that cannot be proven (its commit
record missing or damaged, its shard unreadable, its rows not those the record hashed) and
those after it (ISU makes each batch depend on the ones before) are redone, their shard files
deleted. Besides the manifest's artifacts, the check covers the synthesis commit records (not in
the manifest): a quick check counts them, a full check reads each against its own checksum.

A repair is written down before it starts (`repair.json`, atomically): one that is killed
part-way is finished by the next `d3s run` or `d3s repair` before anything else.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tasks.stage_table import dependents  # the stages' reads, closed transitively

from .arrays import drop_image_shards, images_sha256, read_image_rows, shard_starts
from .fs import RunFS
from .layout import SYN_IMAGES, syn_commit
from .manifest import CorruptArtifact, Manifest, finding, fingerprint
from .records import BATCHES, read_batch_record

PENDING = "repair.json"  # a repair written down before it starts, removed when done


@dataclass(frozen=True)
class Problem:
    """An artifact that is not as the manifest recorded it: status "missing" or "damaged"."""

    rel: str
    status: str
    detail: str


def check_one(fs: RunFS, rel: str, entry: dict[str, Any], quick: bool) -> Problem | None:
    """None if `rel` is intact, else what is wrong with it."""
    problem = _inspect(fs, rel, entry, quick)[0]
    if problem is None and rel == SYN_IMAGES:
        problem = _records_problem(fs, quick)
    return problem


def _inspect(
    fs: RunFS, rel: str, entry: dict[str, Any], quick: bool
) -> tuple[Problem | None, dict[str, Any] | None]:
    """(what is wrong with `rel` or None, its fingerprint now), from one stat pass."""
    now = fingerprint(fs, rel)
    if now is None:
        return Problem(rel, "missing", "the manifest records it, but it is not on disk"), None
    if quick and entry.get("fingerprint") == now:
        return None, now
    actual = fs.sha256(rel)
    if actual != entry["sha256"]:
        was = entry.get("fingerprint")
        size = f"; {was['bytes']} bytes recorded, {now['bytes']} on disk" if was else ""
        detail = f"checksum mismatch (manifest {entry['sha256'][:12]}..., on disk {actual[:12]}...)"
        return Problem(rel, "damaged", detail + size), now
    return None, now


def check(
    fs: RunFS, quick: bool = True, prefixes: tuple[str, ...] = ("",)
) -> tuple[list[Problem], dict[str, dict[str, Any]]]:
    """Every manifest artifact under `prefixes`: (problems, {rel: fingerprint now} of the intact
    ones whose fingerprint was missing or stale, to be recorded with `refresh_fingerprints`)."""
    entries = Manifest(fs).entries()
    problems: list[Problem] = []
    fresh: dict[str, dict[str, Any]] = {}
    for rel in sorted(entries):
        if not rel.startswith(prefixes):
            continue
        problem, now = _inspect(fs, rel, entries[rel], quick)
        if problem is None and rel == SYN_IMAGES:
            problem = _records_problem(fs, quick)
        if problem is not None:
            problems.append(problem)
            continue
        if now is not None and entries[rel].get("fingerprint") != now:
            fresh[rel] = now
    if not quick and SYN_IMAGES not in entries and SYN_IMAGES.startswith(prefixes):
        problem = _unfinished_records_problem(fs)  # a synthesis still running: its records
        if problem is not None:
            problems.append(problem)
    return problems, fresh


def _unfinished_records_problem(fs: RunFS) -> Problem | None:
    """The commit records of a synthesis not finished yet, each against its own checksum."""
    found = (re.match(r"batch_(\d+)\.json$", n) for n in sorted(fs.listdir(BATCHES)))
    return _read_records(fs, [int(m.group(1)) for m in found if m])


def _records_problem(fs: RunFS, quick: bool) -> Problem | None:
    """The commit records of a finished image store: one per batch (quick: counted), each
    intact (full: read against its own checksum)."""
    names = {n for n in fs.listdir(BATCHES) if re.match(r"batch_\d+\.json$", n)}
    try:
        expected = [syn_commit(b) for b in range(1, len(shard_starts(fs, SYN_IMAGES)) + 1)]
    except CorruptArtifact as e:
        return Problem(SYN_IMAGES, "damaged", finding(e))
    missing = [rel for rel in expected if posixpath.basename(rel) not in names]
    if missing or len(names) != len(expected):
        shown = ", ".join(fs.url(rel) for rel in missing[:3]) or "none"
        return Problem(
            SYN_IMAGES,
            "damaged",
            f"{len(names)} commit records for {len(expected)} batches (missing: {shown})",
        )
    return None if quick else _read_records(fs, range(1, len(expected) + 1))


def _read_records(fs: RunFS, batches: Iterable[int]) -> Problem | None:
    """The first of these batches' commit records that fails its own checksum, as a Problem of
    the image store."""
    for b in batches:
        try:
            read_batch_record(fs, b)
        except CorruptArtifact as e:
            return Problem(SYN_IMAGES, "damaged", finding(e))
    return None


def refresh_fingerprints(fs: RunFS, fresh: dict[str, dict[str, Any]]) -> None:
    """Record the fingerprints of artifacts just hashed and found intact (a copied root pays
    the full hash once). The caller holds the run's writer lock."""
    if fresh:
        Manifest(fs).set_fingerprints(fresh)


@dataclass(frozen=True)
class RepairPlan:
    """What `repair` forgets (manifest entries, with their files) and which synthesis batches
    it redoes (from `first_batch` on; None: none, or the whole stage)."""

    problems: list[Problem]
    forget: list[str]
    first_batch: int | None


def plan_repair(fs: RunFS, problems: list[Problem]) -> RepairPlan:
    """What to forget for `problems` (from `check`)."""
    entries = Manifest(fs).entries()
    prefixes = sorted({p for pr in problems for p in dependents(pr.rel)})
    forget = sorted(k for k in entries if k.startswith(tuple(prefixes))) if prefixes else []
    forget += [pr.rel for pr in problems if pr.rel not in forget]
    first = None
    if "synthesis/images.zarr" in forget:
        first = (
            _first_damaged_batch(fs)
            if any(pr.rel == "synthesis/images.zarr" for pr in problems)
            else 1
        )
    return RepairPlan(problems, sorted(set(forget)), first)


def _first_damaged_batch(fs: RunFS) -> int:
    """The first synthesis batch that cannot be proven: its commit record missing or damaged,
    its shard unreadable, or its rows not the ones the record hashed. 1 when the store's own
    metadata cannot be read, or when every batch is proven (the damage is then in the store's
    metadata or class array, which the stage writes once, before the first batch)."""
    try:
        starts = shard_starts(fs, SYN_IMAGES)
    except CorruptArtifact:
        return 1
    for b, start in enumerate(starts, 1):  # one batch's rows in memory at a time
        if not fs.exists(syn_commit(b)):
            return b
        try:
            rec = read_batch_record(fs, b)
            rows = read_image_rows(fs, SYN_IMAGES, start, start + int(rec["count"]))
        except (CorruptArtifact, KeyError, TypeError, ValueError):
            return b
        if rec.get("start") != start or images_sha256(rows) != rec.get("images_sha256"):
            return b
    return 1


def repair(fs: RunFS, plan: RepairPlan) -> None:
    """Carry out `plan`: written down first (`repair.json`), then the manifest entries (an
    artifact not in the manifest is unfinished, whatever is on disk), then the files. The
    caller holds the writer lock."""
    if not plan.forget:
        return
    fs.write_bytes(
        PENDING, json.dumps({"forget": plan.forget, "first_batch": plan.first_batch}).encode()
    )
    _carry_out(fs, plan.forget, plan.first_batch)


def finish_pending_repair(fs: RunFS) -> list[str]:
    """Finish a repair that was killed part-way (the forgotten artifacts, or [] if none was
    pending). The caller holds the writer lock."""
    if not fs.exists(PENDING):
        return []
    try:
        pending = json.loads(fs.read_bytes(PENDING))
        forget, first = list(pending["forget"]), pending["first_batch"]
    except (ValueError, KeyError, TypeError):  # written atomically: only a later damage
        fs.remove(PENDING)
        return []
    _carry_out(fs, forget, first)
    return forget


def _carry_out(fs: RunFS, forget: list[str], first_batch: int | None) -> None:
    """Every step idempotent: a second call after a kill does what the first left undone."""
    manifest = Manifest(fs)
    if any(manifest.is_recorded(rel) for rel in forget):
        manifest.forget_all(forget)
    for rel in forget:
        if rel == SYN_IMAGES:
            _forget_batches_from(fs, first_batch or 1)
        else:
            fs.remove(rel, recursive=True)
    for rel in forget:  # an emptied directory level of a label epoch, a student
        parent = posixpath.dirname(rel)
        if parent and fs.exists(parent) and not fs.listdir(parent):
            fs.remove(parent, recursive=True)
    fs.remove(PENDING)


def _forget_batches_from(fs: RunFS, first: int) -> None:
    """Synthesis redoes batches >= first: their shard files, their commit records and the ISU
    statistics after them go, and so do the checkpoint and the grid; earlier batches' shards
    stay (from batch 1: the whole store goes)."""
    if first == 1:
        fs.remove(SYN_IMAGES, recursive=True)
    elif fs.exists(SYN_IMAGES):
        drop_image_shards(fs, SYN_IMAGES, shard_starts(fs, SYN_IMAGES)[first - 1])
    for name in fs.listdir("synthesis/batches"):
        m = re.match(r"batch_(\d+)\.json$", name)
        if m and int(m.group(1)) >= first:
            fs.remove(f"synthesis/batches/{name}")
    for name in fs.listdir("synthesis/isu"):
        m = re.match(r"after_batch_(\d+)\.", name)
        if m and int(m.group(1)) >= first:
            fs.remove(f"synthesis/isu/{name}")
    fs.remove("synthesis/checkpoint", recursive=True)
    fs.remove("synthesis/png", recursive=True)
