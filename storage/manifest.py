"""The run's manifest: the checksum of every finished artifact.

An artifact is recorded only after it is completely written, so "in the manifest" means
"finished". A stage verifies what it reads against the manifest and stops with an error naming
the file (or recomputes it) when the bytes on disk differ.
"""

from __future__ import annotations

import json
import time
from typing import Any

from .fs import RunFS

MANIFEST = "manifest.json"


class CorruptArtifact(RuntimeError):
    """An artifact on disk does not match its recorded checksum, or has vanished."""


class Manifest:
    def __init__(self, fs: RunFS):
        self.fs = fs

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
        digest = self.fs.sha256(rel)
        data = self._load()
        data["artifacts"][rel] = {"sha256": digest, "stage": stage, "time": time.time(), **meta}
        self.fs.write_bytes(MANIFEST, json.dumps(data, indent=1, sort_keys=True).encode())
        return digest

    def forget(self, prefix: str) -> None:
        data = self._load()
        data["artifacts"] = {k: v for k, v in data["artifacts"].items() if not k.startswith(prefix)}
        self.fs.write_bytes(MANIFEST, json.dumps(data, indent=1, sort_keys=True).encode())

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
            raise CorruptArtifact(f"{self.fs.url(rel)}: missing (the manifest records it)")
        actual = self.fs.sha256(rel)
        if actual != expected:
            raise CorruptArtifact(
                f"{self.fs.url(rel)}: checksum mismatch (manifest {expected[:12]}..., "
                f"on disk {actual[:12]}...); the file was changed or damaged after it was written"
            )
        return actual
