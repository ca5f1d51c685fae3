"""Data-parallel synthesis (stage 3) over several processes, launched with torchrun:

python -m torch.distributed.run --standalone --nproc-per-node N \\
    -m tasks.distributed_synthesis ROOT --config run.json

One process per GPU with NCCL (config device "cuda": rank r uses GPU LOCAL_RANK), or per CPU
worker with gloo. Each rank optimises its rows of every batch; the per-layer statistics and the
cross-entropy sum are all-reduced, so the images equal a single process's to float tolerance
(docs/distributed.md). Rank 0 takes the run's writer lock and writes everything; the other
ranks attach to the run to read (teachers, statistics, checkpoints on resume).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from d3s_core.distributed import World
from storage.config import RunConfig, parse_config
from storage.run import Run, attach_run, open_run

from .credentials import storage_options
from .stages.synthesis import synthesize


def _device_for_rank(cfg: RunConfig, world: World | None) -> None:
    if not cfg.device.startswith("cuda"):
        return
    if world is not None and cfg.device != "cuda":
        raise ValueError(
            f'device {cfg.device!r} names one GPU for {world.size} ranks; use "cuda" '
            "(each rank takes GPU LOCAL_RANK)"
        )
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def _open(root: str, cfg: RunConfig, world: World | None, attach: bool = False) -> Run:
    """Rank 0 opens the run for writing (lock, config check) and tells the others whether it
    could; they then attach without the lock. With `attach`, the process that launched this
    job holds the lock for it (the flow's synthesis task) and every rank attaches."""
    opts = storage_options(cfg)
    if attach:
        return attach_run(root, cfg, **opts)
    if world is None:
        return open_run(root, cfg, **opts)
    run: Run | None = None
    failure: list[str | None] = [None]
    if world.is_writer:
        try:
            run = open_run(root, cfg, **opts)
        except Exception as e:
            failure = [f"{type(e).__name__}: {e}"]
            dist.broadcast_object_list(failure, src=0, group=world.group)
            raise
    dist.broadcast_object_list(failure, src=0, group=world.group)
    if failure[0] is not None:
        raise RuntimeError(f"rank 0 could not open the run: {failure[0]}")
    return run if run is not None else attach_run(root, cfg, **opts)


def launch(root: str, cfg: RunConfig, log: Callable[[str], None] = print) -> str:
    """Run synthesis as a torchrun job of `cfg.distributed.ranks` processes on this machine and
    wait for it; the caller holds the run's lock (the ranks attach). Each output line of the job
    goes to `log`. Returns the images' URL."""
    spec = cfg.distributed
    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "config.json"
        config_file.write_text(json.dumps(cfg.model_dump(mode="json")))
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(spec.ranks),
            "-m",
            "tasks.distributed_synthesis",
            root,
            "--config",
            str(config_file),
            "--attach",
            "--timeout-min",
            str(spec.timeout_min),
        ]
        if spec.backend:
            cmd += ["--backend", spec.backend]
        env = dict(os.environ)
        if not cfg.device.startswith("cuda"):  # CPU ranks share the cores
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // spec.ranks)))
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        url: str | None = None
        tail: list[str] = []
        for line in proc.stdout:
            line = line.rstrip()
            log(line)
            tail = (tail + [line])[-20:]
            if line.startswith("synthesis: "):
                url = line.removeprefix("synthesis: ")
        if proc.wait() != 0 or url is None:
            raise RuntimeError(
                f"distributed synthesis ({spec.ranks} ranks) failed with exit status "
                f"{proc.returncode}:\n" + "\n".join(tail)
            )
    return url


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tasks.distributed_synthesis", description=__doc__)
    ap.add_argument("root", help="run root: a local path or fsspec URL")
    ap.add_argument("--config", required=True, help="JSON config file")
    ap.add_argument(
        "--backend", choices=["nccl", "gloo"], help="default: nccl on CUDA, gloo on CPU"
    )
    ap.add_argument(
        "--timeout-min",
        type=float,
        default=30.0,
        help="how long a rank waits in a collective for the others (rank 0 writing included)",
    )
    ap.add_argument(
        "--attach",
        action="store_true",
        help="the launching process holds the run's lock for this job (used by the flow)",
    )
    args = ap.parse_args(argv)
    with open(args.config) as f:
        cfg = parse_config(json.load(f), args.config)
    backend = args.backend or ("nccl" if cfg.device.startswith("cuda") else "gloo")
    launched = "WORLD_SIZE" in os.environ
    if launched:
        dist.init_process_group(backend, timeout=timedelta(minutes=args.timeout_min))
    try:
        world = World.current()
        _device_for_rank(cfg, world)
        with _open(args.root, cfg, world, args.attach) as run:
            url = synthesize(run, world=world)
        if world is None or world.is_writer:
            print(f"synthesis: {url}", flush=True)
    finally:
        if launched:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
