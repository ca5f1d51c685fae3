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
store keeps its intact leading batches: only the first damaged batch and those after it (ISU
makes each batch depend on the ones before) are redone.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass
from typing import Any

from tasks.stage_table import dependents  # the stages' reads, closed transitively

from .fs import RunFS
from .manifest import Manifest, fingerprint


@dataclass(frozen=True)
class Problem:
    """An artifact that is not as the manifest recorded it: status "missing" or "damaged"."""

    rel: str
    status: str
    detail: str


def check_one(fs: RunFS, rel: str, entry: dict[str, Any], quick: bool) -> Problem | None:
    """None if `rel` is intact, else what is wrong with it."""
    return _inspect(fs, rel, entry, quick)[0]


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
        if problem is not None:
            problems.append(problem)
            continue
        if now is not None and entries[rel].get("fingerprint") != now:
            fresh[rel] = now
    return problems, fresh


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
    """The first synthesis batch whose images no longer match its commit record (1 if the
    store cannot be read at all)."""
    from .arrays import images_sha256, read_image_rows  # torch and zarr only when repairing

    commits = sorted(f for f in fs.listdir("synthesis/batches") if f.endswith(".json"))
    for name in commits:  # one batch's rows in memory at a time
        rec = json.loads(fs.read_bytes(f"synthesis/batches/{name}"))
        try:
            rows = read_image_rows(
                fs, "synthesis/images.zarr", rec["start"], rec["start"] + rec["count"]
            )
        except Exception:  # the store cannot be read: redo it all, as before
            return 1
        if images_sha256(rows) != rec["images_sha256"]:
            return int(rec["batch"])
    return len(commits) + 1


def repair(fs: RunFS, plan: RepairPlan) -> None:
    """Carry out `plan`: the manifest entries first (an artifact not in the manifest is
    unfinished, whatever is on disk), then the files. The caller holds the writer lock."""
    if not plan.forget:
        return
    Manifest(fs).forget_all(plan.forget)
    for rel in plan.forget:
        if rel == "synthesis/images.zarr" and plan.first_batch is not None:
            _forget_batches_from(fs, plan.first_batch)
            continue
        fs.remove(rel, recursive=True)
    for rel in plan.forget:  # an emptied directory level of a label epoch, a student
        parent = posixpath.dirname(rel)
        if parent and fs.exists(parent) and not fs.listdir(parent):
            fs.remove(parent, recursive=True)


def _forget_batches_from(fs: RunFS, first: int) -> None:
    """Synthesis redoes batches >= first: their commit records and the ISU statistics after
    them go, and so do the checkpoint and the grid; earlier batches' chunks stay."""
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
