"""A tiny whole run on one device, stage by stage, with each stage's time and peak memory.

The config is the tests' tiny synthetic one (tests/test_resume_kill.py CONFIG, smaller):
160 synthetic 28 px images of 10 classes, 2 teachers, 2 synthesis batches of 10 images (so
batch 2 mixes the ISU statistics of batch 1), labels and one validation student. Each stage of
tasks.stages.STAGES (the stage table's, data first) runs in this process, between
torch.cuda.reset_peak_memory_stats and max_memory_allocated / max_memory_reserved. Then
`d3s STAGE CONFIG --root ROOT` runs each of them over the finished run in a fresh process (one
shell command): every stage verifies its artifacts and returns. `--json PATH` writes the figures.

    python bench/gpu_pipeline.py /tmp/smoke-run --device cuda --json pipeline.json
    .venv/bin/python bench/gpu_pipeline.py /tmp/smoke-run --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from storage.config import parse_config  # noqa: E402
from storage.run import open_run, syn_commit  # noqa: E402
from tasks.stages import STAGES  # noqa: E402

SYNTHESIS_BATCHES = 2


def smoke_config(device: str, iterations: int) -> dict[str, Any]:
    return {
        "name": "gpu-smoke",
        "preset": "demo-mnist",
        "device": device,
        "dataset": {"kind": "synthetic", "synthetic_size": 160},
        "teachers": {"count": 2, "train": {"epochs": 2}},
        "stats": {"batch_size": 16, "workers": 0},
        "synthesis": {
            "ipc": 2,  # 10 classes x 2 = 20 images = 2 batches of 10
            "batch_size": 10,
            "checkpoint_every": max(1, iterations // 2),
            "params": {"iterations": iterations},
        },
        "labels": {"epochs": 2, "batch_size": 10},
        "validation": {"students": 1, "epochs": 2},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", help="run root (a fresh local folder)")
    ap.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    ap.add_argument("--iterations", type=int, default=8, help="synthesis iterations per batch")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_pipeline.py: error: --device cuda, but torch.cuda.is_available() is False")
        return 2
    cuda = args.device == "cuda"
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    raw = smoke_config(args.device, args.iterations)
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    config_path = root.parent / f"{root.name}-config.json"
    config_path.write_text(json.dumps(raw, indent=2) + "\n")
    cfg = parse_config(raw)
    print(f"torch {torch.__version__} on {name}; run {root}; config {config_path}")

    rows: list[dict[str, Any]] = []
    failed: str | None = None
    with open_run(str(root), cfg) as run:
        for stage, fn in STAGES.items():
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            try:
                result = fn(run)
            except Exception as e:  # report the stage, then stop: later stages need it
                failed = stage
                print(f"{stage}: FAILED: {type(e).__name__}: {e}", flush=True)
                rows.append({"stage": stage, "ok": False, "error": f"{type(e).__name__}: {e}"})
                break
            if cuda:
                torch.cuda.synchronize(device)
            row = {"stage": stage, "ok": True, "seconds": time.perf_counter() - start}
            if cuda:
                row["peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
                row["peak_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
            rows.append(row)
            print(f"{stage}: {result}", flush=True)
        batches_done = sum(run.fs.exists(syn_commit(b)) for b in range(1, SYNTHESIS_BATCHES + 1))

    print(f"{'stage':<12}{'seconds':>9}{'peak alloc MiB':>16}{'peak reserved MiB':>19}")
    for r in rows:
        if not r["ok"]:
            print(f"{r['stage']:<12}{'FAILED':>9}")
            continue
        alloc = f"{r['peak_allocated_mib']:.1f}" if cuda else "-"
        reserved = f"{r['peak_reserved_mib']:.1f}" if cuda else "-"
        print(f"{r['stage']:<12}{r['seconds']:>9.1f}{alloc:>16}{reserved:>19}")
    print(f"synthesis batches committed: {batches_done} of {SYNTHESIS_BATCHES}")

    rerun: dict[str, Any] = {"skipped": failed is not None}
    if failed is None:
        # The command line over the finished run: every stage verifies and returns.
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        d3s = f"{shlex.quote(sys.executable)} -m flows.cli"
        where = f"{shlex.quote(str(config_path))} --root {shlex.quote(str(root))}"
        cmd = " && ".join(f"{d3s} {name} {where}" for name in STAGES)
        start = time.perf_counter()
        proc = subprocess.run(cmd, shell=True, cwd=REPO, env=env, capture_output=True, text=True)
        rerun = {
            "returncode": proc.returncode,
            "seconds": time.perf_counter() - start,
            "output": (proc.stdout + proc.stderr)[-4000:],
        }
        print(
            f"$ d3s STAGE {config_path} --root {root} for {', '.join(STAGES)}  "
            f"(rc {proc.returncode}, {rerun['seconds']:.1f} s)"
        )
        print(rerun["output"], end="" if rerun["output"].endswith("\n") else "\n")
    ok = failed is None and batches_done == SYNTHESIS_BATCHES and rerun.get("returncode") == 0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device_name": name,
                    "torch": torch.__version__,
                    "config": raw,
                    "stages": rows,
                    "synthesis_batches_committed": batches_done,
                    "cli_rerun": rerun,
                    "ok": ok,
                },
                f,
                indent=2,
            )
            f.write("\n")
        print(f"wrote {args.json}")
    print(f"pipeline on {name}: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
