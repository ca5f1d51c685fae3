"""Seed one run root with finished artifacts of another (a study's shared teachers and
statistics, or a variant's images and label epochs), so the stages of the seeded run find them
finished and do no work.

Every artifact is verified against the source's manifest before it is copied, written
atomically, and recorded in the destination's manifest only when its checksum there equals the
source's, with `copied_from` naming the source. Seeding is idempotent: an artifact the
destination already records with the same checksum is kept; a different checksum is an error
(the destination made its own, and mixing the two would be wrong).
"""

from __future__ import annotations

from .fs import RunFS
from .labels import LABELS_SCHEMA_VERSION, epoch_schema_version
from .manifest import CorruptArtifact, Manifest
from .run import STATS, SYN_IMAGES, labels_epoch

# Files that travel with an artifact but are not in the manifest (read by the report), and
# in-progress or bulky resume state that a finished artifact never needs.
_SKIP = ("/checkpoint", "/checkpoints/", "synthesis/isu/", "/.tmp-")


def _wanted(rel: str) -> bool:
    return not any(s in f"/{rel}" for s in _SKIP)


def copy_artifacts(
    src: RunFS,
    dst: RunFS,
    prefix: str,
    keys: list[str] | None = None,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """Copy the finished artifacts under `prefix` (the manifest keys listed in `keys`, default
    every key under it) from `src` to `dst`; the files in `extra` (files or folders of derived
    files: "synthesis/" for the batch records and the PNG grid, "stats.zarr/zarr.json") that
    belong to no manifest key are copied too, unless `dst` has them. `dst` must be held by this
    process's writer lock. Returns the manifest keys now recorded in `dst` from `src`."""
    src_m, dst_m = Manifest(src), Manifest(dst)
    entries = src_m.entries()
    if keys is None:
        keys = sorted(k for k in entries if k.startswith(prefix))
    if not keys:
        raise CorruptArtifact(f"{src.url(prefix)}: no finished artifact to share")
    done = dst_m.entries()
    copied = []
    for key in keys:
        digest = src_m.verify(key)  # names the file if missing or not finished
        if key in done:
            if done[key]["sha256"] != digest:
                raise CorruptArtifact(
                    f"{dst.url(key)}: this run already has its own {key} (checksum "
                    f"{done[key]['sha256'][:12]}..., the source's {digest[:12]}...); "
                    "use a new root"
                )
            dst_m.verify(key)
            continue
        dst.remove(key, recursive=True)  # a half-copied tree from a killed seeding
        for rel in src.walk_files(key):
            if _wanted(rel):
                dst.write_bytes(rel, src.read_bytes(rel))
        meta = {k: v for k, v in entries[key].items() if k not in ("sha256", "stage", "time")}
        got = dst_m.record(key, entries[key]["stage"], copied_from=src.url(key), **meta)
        if got != digest:
            raise CorruptArtifact(
                f"{dst.url(key)}: copy's checksum {got[:12]}... differs from the source's "
                f"{digest[:12]}... ({src.url(key)})"
            )
        copied.append(key)
    for rel in (f for e in extra for f in src.walk_files(e.rstrip("/"))):
        owned = any(rel == k or rel.startswith(k + "/") for k in entries)
        if _wanted(rel) and not owned and not dst.exists(rel):
            dst.write_bytes(rel, src.read_bytes(rel))
    return keys


def seed_run(
    dst: RunFS,
    shared: RunFS,
    stats: bool = True,
    images_from: RunFS | None = None,
    labels_from: RunFS | None = None,
    label_epochs: int = 0,
) -> dict[str, list[str]]:
    """Seed `dst` with the teachers (and the statistics) of `shared`, the distilled images of
    `images_from` and label epochs [0, min(label_epochs, what `labels_from` has)) written with
    this code's label schema. The caller
    checks that the sources' configs make these artifacts the ones `dst` would compute
    (storage/study.py: synthesis_key, labelling_key). Returns the keys seeded, by stage."""
    out = {"teachers": copy_artifacts(shared, dst, "teachers/")}
    if stats:
        out["stats"] = copy_artifacts(shared, dst, f"{STATS}/", extra=(STATS,))
    if images_from is not None:
        out["synthesis"] = copy_artifacts(images_from, dst, SYN_IMAGES, extra=("synthesis",))
    if labels_from is not None:
        have = Manifest(labels_from).entries()
        mine = Manifest(dst).entries()
        # Only epochs this code would write: one from an older label schema (e.g. v1's
        # unquantised boxes) is labelled again rather than mixed into a newer run. An epoch
        # the run already has is its own and kept (it may come from another source, or from
        # older code, when the study grew since).
        keys = [
            labels_epoch(e)
            for e in range(label_epochs)
            if labels_epoch(e) in have
            and labels_epoch(e) not in mine
            and epoch_schema_version(labels_from, labels_epoch(e)) == LABELS_SCHEMA_VERSION
        ]
        if keys:
            out["labels"] = copy_artifacts(
                labels_from, dst, "labels/", keys, extra=("labels/_schema.json",)
            )
    return out
