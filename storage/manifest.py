"""The run's manifest: the checksum of every finished artifact.

An artifact is recorded only after it is completely written, so "in the manifest" means
"finished". A stage verifies what it reads against the manifest and stops with an error naming
the file (or recomputes it) when the bytes on disk differ.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from .fs import RunFS

MANIFEST = "manifest.json"


REMEDY = "run `d3s repair {root}` to forget it and what was computed from it, then run again"


class CorruptArtifact(RuntimeError):
    """An artifact on disk does not match its recorded checksum, or has vanished."""


def fingerprint(fs: RunFS, rel: str) -> dict[str, Any] | None:
    """Files, total bytes and latest modification time of an artifact (a file or a tree), from
    one listing and a stat per file; None if it does not exist. Recorded with the checksum, so
    a later check can tell an untouched artifact without reading it (storage/integrity.py)."""
    base = fs.path(rel)
    if not fs.fs.exists(base):
        return None
    if fs.fs.isfile(base):
        infos = [fs.fs.info(base)]
    else:
        infos = list(fs.fs.find(base, detail=True).values())
    latest, size = "", 0
    for info in infos:
        size += int(info.get("size") or 0)
        stamp = info.get("mtime", info.get("LastModified", info.get("updated", "")))
        latest = max(latest, repr(stamp))
    return {"files": len(infos), "bytes": size, "mtime": latest}


class Manifest:
    """guard: called before every write of the manifest (the writer lock's `check`: a process
    that lost an object-store lease must not record artifacts)."""

    def __init__(self, fs: RunFS, guard: Callable[[], None] | None = None):
        self.fs = fs
        self.guard = guard

    def _load(self) -> dict[str, Any]:
        if not self.fs.exists(MANIFEST):
            return {"version": 1, "artifacts": {}}
        try:
            data = json.loads(self.fs.read_bytes(MANIFEST))
        except json.JSONDecodeError as e:
            raise CorruptArtifact(f"{self.fs.url(MANIFEST)}: not valid JSON ({e})") from e
        if not isinstance(data, dict) or "artifacts" not in data:
            raise CorruptArtifact(f"{self.fs.url(MANIFEST)}: missing 'artifacts'")
        return data

    def entries(self) -> dict[str, dict[str, Any]]:
        return dict(self._load()["artifacts"])

    def record(self, rel: str, stage: str, **meta: Any) -> str:
        """Checksum `rel` as it is now and record it; returns the checksum."""
        before = fingerprint(self.fs, rel)
        digest = self.fs.sha256(rel)
        entry: dict[str, Any] = {"sha256": digest, "stage": stage, "time": time.time(), **meta}
        if before is not None and fingerprint(self.fs, rel) == before:  # unchanged while hashed
            entry["fingerprint"] = before
        data = self._load()
        data["artifacts"][rel] = entry
        self._save(data)
        return digest

    def _save(self, data: dict[str, Any]) -> None:
        if self.guard is not None:
            self.guard()
        self.fs.write_bytes(MANIFEST, json.dumps(data, indent=1, sort_keys=True).encode())

    def forget(self, prefix: str) -> None:
        data = self._load()
        data["artifacts"] = {k: v for k, v in data["artifacts"].items() if not k.startswith(prefix)}
        data["generation"] = data.get("generation", 0) + 1
        self._save(data)

    def forget_all(self, rels: list[str]) -> None:
        """Forget these artifacts (exact names), in one write."""
        data = self._load()
        data["artifacts"] = {k: v for k, v in data["artifacts"].items() if k not in set(rels)}
        data["generation"] = data.get("generation", 0) + 1
        self._save(data)

    def generation(self) -> int:
        """How many times artifacts were forgotten (by a repair): part of Prefect's cache key,
        so a stage result cached before a repair is not reused after it."""
        return int(self._load().get("generation", 0))

    def set_fingerprints(self, fresh: dict[str, dict[str, Any]]) -> None:
        """Record the current fingerprints of artifacts just verified in full."""
        data = self._load()
        for rel, fp in fresh.items():
            if rel in data["artifacts"]:
                data["artifacts"][rel]["fingerprint"] = fp
        self._save(data)

    def is_recorded(self, rel: str) -> bool:
        return rel in self._load()["artifacts"]

    def checksum(self, rel: str) -> str:
        entry = self._load()["artifacts"].get(rel)
        if entry is None:
            raise CorruptArtifact(
                f"{self.fs.url(rel)}: not a finished artifact of this run (the stage that writes "
                "it has not completed; run it first)"
            )
        return str(entry["sha256"])

    def verify(self, rel: str) -> str:
        """Raise CorruptArtifact naming the file unless its bytes match the manifest."""
        expected = self.checksum(rel)
        if not self.fs.exists(rel):
            raise CorruptArtifact(
                f"{self.fs.url(rel)}: missing (the manifest records it); "
                + REMEDY.format(root=self.fs.url())
            )
        actual = self.fs.sha256(rel)
        if actual != expected:
            raise CorruptArtifact(
                f"{self.fs.url(rel)}: checksum mismatch (manifest {expected[:12]}..., "
                f"on disk {actual[:12]}...); the file was changed or damaged after it was written; "
                + REMEDY.format(root=self.fs.url())
            )
        return actual
