"""Launching data-parallel synthesis as a torchrun job on this machine (the job's entry point
is tasks/distributed_synthesis.py). The synthesis runner launches it when the config asks for
more than one rank; kept apart from the entry point so that the runner and the job do not import
each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from storage.config import RunConfig


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
