"""The manifest's cost per write with its previous generation kept beside it and its own
checksum (issue 24), against the same write without them, in the same process, at the entry
counts of a demo run and of an ImageNet-21K run.

An ImageNet-21K run (5 teachers, IPC 10, 300 fp16 label epochs for the distilled set and one
baseline, 3 students x 2 protocols x 2 sets) records about 5 x 2 + 5 + 1 + 2 x 300 + 2 x 2 x 3 x 2
+ 4 = ~650 artifacts; the manifest is rewritten once per artifact. Prints the seconds per
`record` (each also hashes the artifact: here a 1 KiB file) and the ratio.

    .venv/bin/python bench/bench_manifest.py --entries 30 650 2000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.fs import RunFS  # noqa: E402
from storage.manifest import Manifest  # noqa: E402


class Plain(Manifest):
    """The write as it was before issue 24: no previous generation, no self-checksum."""

    def _write(self, data, keep_previous):
        self.fs.write_bytes("manifest.json", json.dumps(data, indent=1, sort_keys=True).encode())


def per_record(cls: type[Manifest], entries: int, repeats: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        fs = RunFS(tmp)
        fs.write_bytes("a.bin", b"x" * 1024)
        m = cls(fs, config_hash="0" * 64)
        m.record("a.bin", "bench")
        data = m._load()  # the manifest as it is when the next artifact is recorded
        for i in range(entries):
            data["artifacts"][f"labels/epoch={i}/part-0.parquet"] = dict(
                data["artifacts"]["a.bin"], stage="labels"
            )
        m._write(data, keep_previous=False)
        start = time.perf_counter()
        for _ in range(repeats):
            m.record("a.bin", "bench")
        return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, nargs="+", default=[30, 650, 2000])
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    print(f"{'entries':>8} {'plain ms':>9} {'kept ms':>8} {'ratio':>6}")
    for n in args.entries:
        plain = per_record(Plain, n, args.repeats)
        kept = per_record(Manifest, n, args.repeats)
        print(f"{n:>8} {plain * 1e3:>9.2f} {kept * 1e3:>8.2f} {kept / plain:>6.2f}")


if __name__ == "__main__":
    main()
