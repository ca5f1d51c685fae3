"""Throughput table for `d3s plan`: seconds per image of each kind of work, as FLOP/s.

For a few (architecture, image size) points, each kind of work of tasks/plan (`WORK_KINDS`:
teacher step, statistics forward, synthesis iteration, label forward, student step) is run on
real random tensors by the same `work_step` the plan counts, timed (median of repeats after a
warm-up; CUDA synchronised), and divided into its FLOPs per image, counted by
torch.utils.flop_counter.FlopCounterMode on a real batch of 2. `d3s plan` applies the rate of the
point nearest in FLOPs per image to any model and size. Also measured: the process baseline
(RSS of a fresh Python with torch, and with the stage modules, imported) and, on CUDA, the
device memory of a bare CUDA context. Writes JSON with the machine, date, torch and command.

    .venv/bin/python bench/bench_throughput.py                 # tasks/plan/throughput/cpu.json
    .venv/bin/python bench/bench_throughput.py --device cuda   # tasks/plan/throughput/cuda.json
    .venv/bin/python bench/bench_throughput.py --device cuda --out h100.json
    .venv/bin/d3s plan run.json --throughput h100.json         # a table other than the device's

The tables of the package (tasks/plan/throughput/<device kind>.json, shipped in the wheel) are
the ones `d3s plan` reads for a config's device; bench/gpu_smoke.sh measures cuda.json on a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from d3s_core.layers import select_layers
from d3s_core.models import build_model
from tasks.plan import WORK_KINDS, count_flops, prepare, table_path, work_step

# (name, arch, width, image size, channels, low-res stem, classes, CPU batch, GPU batch)
POINTS = [
    ("small_resnet-w16-28px", "small_resnet", 16, 28, 1, True, 10, 128, 256),
    ("resnet18-112px", "resnet18", 64, 112, 3, False, 1000, 4, 256),
    ("resnet18-224px", "resnet18", 64, 224, 3, False, 1000, 2, 200),
]
STAGE_MODULES = (
    "torch, torchvision, zarr, pyarrow, storage.arrays, storage.labels, d3s_core.synthesis"
)


# After the imports: one step of each kind of work on a tiny model, then the heap trimmed. The
# kernels' code pages (oneDNN, MKL, cuDNN) are resident from then on in a stage's process; the
# import alone left them out (on CPU 61 MiB more, measured 2026-12: 833 -> 904 MiB).
AFTER_WORK = """
import ctypes, torch
from d3s_core.layers import select_layers
from d3s_core.models import build_model
from tasks.plan import WORK_KINDS, prepare, work_step
dev = {device!r}
m = build_model("small_resnet", 10, in_chans=3, low_res=True, width=4).to(dev)
layers = select_layers(m)
x = torch.randn(4, 3, 16, 16, device=dev)
y = torch.zeros(4, dtype=torch.int64, device=dev)
for k in WORK_KINDS:
    prepare(k, m)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) if k.endswith("step") else None
    work_step(k, m, x, y, layers, opt)
del m, x, y, opt
if dev.startswith("cuda"):
    torch.cuda.synchronize()
ctypes.CDLL("libc.so.6").malloc_trim(0)
"""


def rss_after_import(modules: str, cuda: bool = False, after: str = "") -> int | None:
    """VmRSS of a fresh interpreter after importing `modules` (and starting CUDA), then
    running `after`."""
    code = (
        f"import {modules}\n"
        + (
            "import torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize()\n"
            if cuda
            else ""
        )
        + after
        + "\nprint(open('/proc/self/status').read())"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
        ).stdout
    except (subprocess.SubprocessError, OSError) as e:
        print(f"could not measure RSS after importing {modules}: {e}", file=sys.stderr)
        return None
    m = re.search(r"VmRSS:\s+(\d+) kB", out)
    return int(m.group(1)) * 1024 if m else None


def cuda_context_bytes() -> int:
    """Device memory in use once a CUDA context exists, before any tensor of ours."""
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


def machine_facts(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
            cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    facts = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": list(os.getloadavg()),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        facts |= {"gpu": props.name, "gpu_memory_bytes": props.total_memory}
        facts["description"] = props.name
    else:
        facts["description"] = f"{cpu}, {torch.get_num_threads()} threads"
    return facts


def time_kind(kind: str, model, x, y, layers, device: str, min_seconds: float, reps: int):
    """Median seconds of one step of `kind` on the batch x, after a warm-up step; at least
    `reps` timed steps, more until `min_seconds` have passed (at most 50)."""
    prepare(kind, model)
    opt = None
    if kind in ("teacher_step", "student_step"):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    work_step(kind, model, x, y, layers, opt)
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start < min_seconds and len(times) < 50):
        t0 = time.perf_counter()
        work_step(kind, model, x, y, layers, opt)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


def measure_point(point, device: str, min_seconds: float, reps: int) -> dict:
    name, arch, width, size, chans, low_res, classes, cpu_b, gpu_b = point
    batch = gpu_b if device.startswith("cuda") else cpu_b
    torch.manual_seed(0)
    model = build_model(arch, classes, in_chans=chans, low_res=low_res, width=width).to(device)
    layers = select_layers(model)
    x = torch.randn(batch, chans, size, size, device=device)
    y = torch.randint(classes, (batch,), device=device)
    work = {}
    for kind in WORK_KINDS:
        flops = count_flops(kind, model, x[:2], y[:2], layers) / 2
        seconds, n = time_kind(kind, model, x, y, layers, device, min_seconds, reps)
        per_image = seconds / batch
        work[kind] = {
            "seconds_per_image": per_image,
            "flops_per_image": flops,
            "flops_per_s": flops / per_image,
            "repeats": n,
        }
        print(
            f"{name:<24} {kind:<20} batch {batch:>4}  {per_image * 1e3:9.3f} ms/image  "
            f"{flops / 1e9:8.3f} GFLOP/image  {flops / per_image / 1e9:8.1f} GFLOP/s",
            flush=True,
        )
    return {
        "name": name,
        "arch": arch,
        "width": width,
        "image_size": size,
        "in_chans": chans,
        "low_res": low_res,
        "num_classes": classes,
        "batch": batch,
        "work": work,
    }


def process_rss(device: str) -> dict[str, int | None]:
    """The process baselines `d3s plan` adds to every stage (it uses `after_work`)."""
    cuda = device.startswith("cuda")
    return {
        "torch": rss_after_import("torch", cuda),
        "stage_modules": rss_after_import(STAGE_MODULES, cuda),
        "after_work": rss_after_import(STAGE_MODULES, cuda, AFTER_WORK.format(device=device)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--out", help="JSON file (default: the package's tasks/plan/throughput/<device kind>.json)"
    )
    ap.add_argument("--min-seconds", type=float, default=0.0, help="timed seconds per kind")
    ap.add_argument("--reps", type=int, default=2, help="at least this many timed steps")
    ap.add_argument("--points", nargs="*", help="names of POINTS to measure (default: all)")
    ap.add_argument(
        "--rss-only",
        action="store_true",
        help="measure the process baselines again into the existing table (rates kept)",
    )
    args = ap.parse_args(argv)
    device = args.device
    out = Path(args.out or table_path(device))
    if args.rss_only:
        table = json.loads(out.read_text())
        table["process_rss_bytes"] = process_rss(device)
        table["process_rss_date"] = datetime.datetime.now(datetime.UTC).isoformat(
            timespec="seconds"
        )
        out.write_text(json.dumps(table, indent=1) + "\n")
        print(f"updated the process baselines of {out}: {table['process_rss_bytes']}")
        return 0
    points = [p for p in POINTS if not args.points or p[0] in args.points]
    cuda = device.startswith("cuda")
    table = {
        "schema": 1,
        "device": device,
        "machine": machine_facts(device),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "process_rss_bytes": process_rss(device),
        "cuda_context_bytes": cuda_context_bytes() if cuda else None,
        "notes": "seconds_per_image: median step time / batch; flops_per_image: "
        "torch.utils.flop_counter (matmuls and convolutions, 2 per MAC); "
        "flops_per_s = flops_per_image / seconds_per_image. The work is tasks/plan "
        "work_step: synthesis without the KL's Cholesky factorisations and the crops, "
        "training steps with SGD.",
        "points": [measure_point(p, device, args.min_seconds, args.reps) for p in points],
    }
    table["machine"]["loadavg_after"] = list(os.getloadavg())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
