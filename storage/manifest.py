"""The run's manifest: the checksum of every finished artifact.

An artifact is recorded only after it is completely written, so "in the manifest" means
"finished". A stage verifies what it reads against the manifest and stops with an error naming
the file (or recomputes it) when the bytes on disk differ.

The manifest checks itself: it carries the SHA-256 of its own content (`self_sha256`), so a
flipped byte that still parses as JSON is found as surely as one that does not. Every write
keeps the previous generation beside it (`manifest.prev.json`, written atomically first):
a manifest that is damaged, or lost while its previous generation is there, is refused with
one line naming `d3s repair ROOT`, which restores the previous generation and checks every
artifact against it (an artifact recorded after it is simply recomputed).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

from .fs import RunFS

MANIFEST = "manifest.json"
PREVIOUS = "manifest.prev.json"  # the generation before the last write
KEEP_ON_START_OVER = ("config.json", "dataset", MANIFEST, PREVIOUS)
NOTHING_PROVEN = ": nothing on disk can be proven, every artifact is recomputed (its files removed)"

REMEDY = (
    "run `d3s repair {root}` to forget it and what was computed from it, then run again "
    "(or `d3s run --repair`)"
)


class CorruptArtifact(RuntimeError):
    """An artifact on disk does not match its recorded checksum, cannot be read, or has
    vanished. `rel`: the manifest entry it belongs to, where one does (what `d3s run --repair`
    forgets and recomputes when a stage finds it)."""

    def __init__(self, message: str, rel: str | None = None):
        super().__init__(message)
        self.rel = rel

    def __reduce__(self) -> tuple[Any, ...]:  # `rel` survives a pickled task result
        return (type(self), (str(self), self.rel))


def finding(e: CorruptArtifact) -> str:
    """What was found, without the remedy the message ends with."""
    return str(e).split("; run `d3s")[0]


class BrokenManifest(CorruptArtifact):
    """manifest.json itself is damaged or lost: `d3s repair` restores the previous generation."""


def content_sha256(data: Any, without: str | None = None) -> str:
    """SHA-256 of a JSON value's content (keys sorted), a dict's key `without` left out: the
    checksum a self-checking file carries of itself (the manifest, the synthesis commit
    records, the data profile and index, config.json)."""
    if without is not None:
        data = {k: v for k, v in data.items() if k != without}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """A manifest's content, or BrokenManifest naming `where` (not JSON, not a manifest, or not
    the bytes it was written as)."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BrokenManifest(f"{where}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("artifacts"), dict):
        raise BrokenManifest(f"{where}: not a manifest (no 'artifacts' object)")
    if "self_sha256" in data and data["self_sha256"] != content_sha256(data, "self_sha256"):
        raise BrokenManifest(f"{where}: its content does not match its own checksum")
    for rel, entry in data["artifacts"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise BrokenManifest(f"{where}: entry {rel!r} has no checksum")
    return data


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

    def __init__(
        self, fs: RunFS, guard: Callable[[], None] | None = None, config_hash: str | None = None
    ):
        self.fs = fs
        self.guard = guard
        self.config_hash = config_hash  # stamped on every write (config.json's way back)
        self._loaded: bytes | None = None  # the manifest's bytes as the last `_load` read them

    def recorded_config_hash(self) -> str | None:
        """The configuration hash the last write was made under (None: none recorded, or the
        manifest cannot be read)."""
        try:
            return self._load().get("config_hash")
        except BrokenManifest:
            return None

    def _load(self) -> dict[str, Any]:
        if not self.fs.exists(MANIFEST):
            if self.fs.exists(PREVIOUS):  # written before every manifest write: it was lost
                raise BrokenManifest(
                    f"{self.fs.url(MANIFEST)}: missing, but its previous generation "
                    f"{PREVIOUS} is there; {self.restore_remedy()}"
                )
            self._loaded = None
            return {"version": 1, "artifacts": {}}
        try:
            raw = self.fs.read_bytes(MANIFEST)
            data = parse_manifest(raw, self.fs.url(MANIFEST))
            self._loaded = raw  # kept whole as the previous generation by the next write
            return data
        except BrokenManifest as e:
            raise BrokenManifest(f"{e}; {self.restore_remedy()}") from None

    def restore_remedy(self) -> str:
        root = self.fs.url()
        if self.fs.exists(PREVIOUS):
            return (
                f"run `d3s repair {root}`: it restores the previous generation ({PREVIOUS}) "
                "and checks every artifact against it (or `d3s run --repair`)"
            )
        return (
            f"no previous generation ({PREVIOUS}) to restore: run `d3s repair {root}` "
            "to start a new manifest (every artifact is then recomputed)"
        )

    def restore_previous(self) -> str:
        """Replace a damaged or lost manifest by its previous generation (or, without one, an
        empty manifest); what was done, in words. Artifacts recorded since are recomputed;
        the caller checks every artifact against the restored manifest."""
        try:
            if self.fs.exists(MANIFEST):
                parse_manifest(self.fs.read_bytes(MANIFEST), MANIFEST)
                return "the manifest is intact: nothing restored"
        except BrokenManifest:
            pass
        data: dict[str, Any] = {"version": 1, "artifacts": {}}
        done = f"started a new, empty manifest (no {PREVIOUS}){NOTHING_PROVEN}"
        if self.fs.exists(PREVIOUS):
            try:
                data = parse_manifest(self.fs.read_bytes(PREVIOUS), self.fs.url(PREVIOUS))
                done = f"restored the previous generation ({len(data['artifacts'])} artifacts)"
            except BrokenManifest as e:
                done = f"started a new, empty manifest ({e}){NOTHING_PROVEN}"
        # Forgetting is what a restore amounts to: cached stage results must not stand.
        data["generation"] = data.get("generation", 0) + 1
        if not data["artifacts"]:
            # Without a manifest nothing on disk is proven, and the files outside it (commit
            # records, statistics shards) would be reused against recomputed teachers: all go
            # but the configuration, the data's index and profile, and the lock.
            for name in self.fs.listdir(""):
                if name not in KEEP_ON_START_OVER and not name.startswith(".lock"):
                    self.fs.remove(name, recursive=True)
        self._write(data, keep_previous=False)
        return done

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
        self._write(data, keep_previous=True)

    def _write(self, data: dict[str, Any], keep_previous: bool) -> None:
        if self.guard is not None:
            self.guard()
        if keep_previous and self._loaded is not None:
            # The generation being replaced, as every write's `_load` just read and parsed it.
            self.fs.write_bytes(PREVIOUS, self._loaded)
        data = {k: v for k, v in data.items() if k != "self_sha256"}
        if self.config_hash is not None:
            data["config_hash"] = self.config_hash
        data["self_sha256"] = content_sha256(data, "self_sha256")
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
                + REMEDY.format(root=self.fs.url()),
                rel,
            )
        actual = self.fs.sha256(rel)
        if actual != expected:
            raise CorruptArtifact(
                f"{self.fs.url(rel)}: checksum mismatch (manifest {expected[:12]}..., "
                f"on disk {actual[:12]}...); the file was changed or damaged after it was written; "
                + REMEDY.format(root=self.fs.url()),
                rel,
            )
        return actual
