"""Environment helpers for bench/gpu_smoke.sh (no project imports, so they run before the
project's needs are installed).

    python bench/gpu_env.py wheels .whl      # the carried wheels this python lacks (or has older)
    python bench/gpu_env.py imports          # import what the smoke test needs; exit 1 if not
    python bench/gpu_env.py cuda --json env.json   # python, torch, CUDA, the GPU; exit 3 if
                                                   # CUDA is not usable
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import json
import platform
import re
import sys
import time
import traceback
from pathlib import Path

# What the smoke test imports: the pipeline's stages, storage, the tests and the bench.
IMPORTS = [
    "torch",
    "torchvision",
    "numpy",
    "pytest",
    "pydantic",
    "zarr",
    "numcodecs",
    "pyarrow.parquet",
    "safetensors.torch",
    "fsspec",
    "PIL",
    "storage.config",
    "storage.run",
    "tasks.stages",
    "d3s_core.synthesis",
]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _older(installed: str, wanted: str) -> bool:
    try:
        from packaging.version import Version

        return Version(installed) < Version(wanted)
    except Exception:  # no packaging, or an odd version: keep what is there
        return False


def wheels(folder: str) -> int:
    """Print the wheels of `folder` whose distribution is not installed, or installed in an
    older version than the wheel's, one path a line."""
    for whl in sorted(Path(folder).glob("*.whl")):
        name, version = whl.name.split("-")[:2]
        try:
            have = md.version(_norm(name))
        except md.PackageNotFoundError:
            have = None
        if have is None or _older(have, version):
            print(whl)
            print(f"  {name} {version}: installed {have or 'no'}", file=sys.stderr)
        else:
            print(f"  {name} {version}: installed {have}, kept", file=sys.stderr)
    return 0


def imports() -> int:
    bad = 0
    for mod in IMPORTS:
        try:
            importlib.import_module(mod)
        except Exception as e:
            bad += 1
            print(f"  cannot import {mod}: {type(e).__name__}: {e}")
    dists = ["torch", "torchvision", "numpy", "pytest", "pydantic", "zarr", "numcodecs"]
    versions = []
    for d in dists:
        try:
            versions.append(f"{d} {md.version(d)}")
        except md.PackageNotFoundError:
            versions.append(f"{d} -")
    print("  " + ", ".join(versions))
    if bad:
        print(f"imports: {bad} of {len(IMPORTS)} modules cannot be imported")
        return 1
    print(f"imports: all {len(IMPORTS)} modules import")
    return 0


def cuda(json_path: str | None) -> int:
    info: dict = {"python": sys.version.split()[0], "executable": sys.executable}
    info["platform"] = platform.platform()
    ok = False
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["cudnn"] = (
            torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        )
        info["cuda_available"] = torch.cuda.is_available()
        if info["cuda_available"]:
            dev = torch.device("cuda")
            props = torch.cuda.get_device_properties(dev)
            info["device_count"] = torch.cuda.device_count()
            info["device_name"] = torch.cuda.get_device_name(dev)
            info["capability"] = list(torch.cuda.get_device_capability(dev))
            info["memory_gib"] = props.total_memory / 2**30
            info["multiprocessors"] = props.multi_processor_count
            # Usable: an allocation, a kernel and a copy back give the right answer.
            start = time.perf_counter()
            a = torch.randn(1024, 1024, device=dev, dtype=torch.float64)
            err = (a @ torch.eye(1024, device=dev, dtype=torch.float64) - a).abs().max().item()
            torch.cuda.synchronize(dev)
            info["first_kernel_seconds"] = time.perf_counter() - start
            info["check_error"] = err
            ok = err == 0.0
            if not ok:
                info["problem"] = f"a @ I differs from a by {err} on the GPU"
        else:
            info["problem"] = "torch.cuda.is_available() is False"
    except Exception as e:
        info["problem"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    for k, v in info.items():
        print(f"  {k}: {v}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(info, f, indent=2)
            f.write("\n")
    if not ok:
        print(f"CUDA is not usable: {info.get('problem')}")
        return 3
    print(f"CUDA usable: {info['device_name']}, torch {info['torch']} (CUDA {info['torch_cuda']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wheels")
    w.add_argument("folder")
    sub.add_parser("imports")
    c = sub.add_parser("cuda")
    c.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    if args.cmd == "wheels":
        return wheels(args.folder)
    if args.cmd == "imports":
        return imports()
    return cuda(args.json)


if __name__ == "__main__":
    sys.exit(main())
