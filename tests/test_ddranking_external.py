"""External check (issue 15): a run exported in DD-Ranking's layout and evaluated by DD-Ranking
0.2.0 itself, in its own venv (its pins, numpy<2 and scipy<1.16, conflict with ours).

A generated 200-class ImageFolder at 32 px (DD-Ranking's `TinyImageNet` hard-codes 200 classes
and takes images at their size) goes through our stages at tiny settings, IPC 1; the distilled
set and its teacher are exported (storage/ddranking.py) and tools/ddranking_eval.py runs its
hard- and soft-label evaluators on CPU. What must hold: its loaders read what we wrote (classes,
image count, pixels within 1/255 of ours), both evaluators finish with accuracies in [0, 100].
Our hard-protocol figures on the same images sit beside theirs in the JSON written next to the
run (docs/ddranking.md quotes one). The venv is built once and cached by its pins:
~/.cache/d3s-ddranking-venv/<key> (D3S_DDRANKING_VENV overrides the path).

    timeout 1800 .venv/bin/pytest -q -m external tests/test_ddranking_external.py -s
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from storage.arrays import read_images
from storage.config import parse_config
from storage.ddranking import (
    TeacherNotExpressible,
    ddranking_resnet,
    export_ddranking,
    teacher_name,
    to_pixels,
)
from storage.fs import RunFS
from storage.records import read_summary
from storage.run import BASELINE, FULL_DATA, open_run

REPO = Path(__file__).resolve().parents[1]
PINS = ("ddranking==0.2.0", "numpy<2", "scipy<1.16", "torch==2.14.1", "torchvision==0.29.1")
TORCH = "2.14.1"  # the wheel on this machine's disk; pip must not pick another
CLASSES, SIZE, TRAIN_PER_CLASS, VAL_PER_CLASS = 200, 32, 3, 2
# DD-Ranking per trained student (it trains 5 LRs for most sets): 1 epoch of batches of 64
# (4 SGD steps on 200 images); its soft-label student on the distilled set at LR 0.01, so that
# only the random subset's soft students run its LR search (each soft step runs the teacher).
DDR_ARGS = ("--epochs", "1", "--batch-size", "64", "--soft-syn-lr", "0.01")


def ddranking_python() -> Path:
    """The cached venv's python: built with `python3.11 -m venv` + pip install of PINS (torch
    from the local wheel), checked to import ddranking with torch TORCH, then marked."""
    key = hashlib.sha256(" ".join(PINS).encode()).hexdigest()[:12]
    default = Path.home() / ".cache" / "d3s-ddranking-venv" / key
    venv = Path(os.environ.get("D3S_DDRANKING_VENV") or default)
    marker, py = venv / ".d3s-pins", venv / "bin" / "python"
    if marker.exists() and marker.read_text() == "\n".join(PINS):
        return py
    base = shutil.which("python3.11")
    if base is None:
        pytest.skip("python3.11 not found: cannot build DD-Ranking's venv")
    tmp = venv.with_name(venv.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([base, "-m", "venv", str(tmp)], check=True)
    pip = subprocess.run(
        [str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", *PINS],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if pip.returncode != 0:
        pytest.skip(f"pip could not install {PINS}: {pip.stderr[-2000:]}")
    version = subprocess.run(
        [str(tmp / "bin" / "python"), "-c", "import ddranking, torch; print(torch.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert version.startswith(TORCH), f"pip installed torch {version}, not {TORCH}"
    (tmp / ".d3s-pins").write_text("\n".join(PINS))
    shutil.rmtree(venv, ignore_errors=True)
    tmp.rename(venv)  # venvs run from a new path through `bin/python -m`
    return py


def _pattern(c: int, rng: np.random.Generator) -> np.ndarray:
    """A class's image: one of 8 base colours, one of 5 stripe positions, one of 5 stripe
    orientations/widths (200 = 8 x 5 x 5 distinct classes), plus pixel noise."""
    colour = np.array([(c & 1) * 160 + 40, ((c >> 1) & 1) * 160 + 40, ((c >> 2) & 1) * 160 + 40])
    px = rng.normal(colour, 30.0, size=(SIZE, SIZE, 3))
    pos, kind = (c // 8) % 5, (c // 40) % 5
    at = slice(3 + 6 * pos, 3 + 6 * pos + 2 + kind // 2)
    if kind % 2:
        px[:, at] = 255 - colour
    else:
        px[at, :] = 255 - colour
    return np.clip(px, 0, 255).astype(np.uint8)


def tiny_imagenet_tree(root: Path) -> Path:
    """train/ and val/ with 200 class folders n{c:04d} (sorted = class order)."""
    rng = np.random.default_rng(15)
    for split, n in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c in range(CLASSES):
            d = root / split / f"n{c:04d}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(_pattern(c, rng), "RGB").save(d / f"{i}.png")
    return root


def tiny_config(data: Path) -> dict:
    return {
        "preset": "tiny-imagenet",
        "dataset": {
            "kind": "imagefolder",
            "path": str(data / "train"),
            "val_path": str(data / "val"),
        },
        # The teacher is a ResNet-18 with the 3x3 stem (exportable); students are small.
        "model": {"width": 8},
        "teachers": {"count": 1, "train": {"epochs": 1, "batch_size": 64}},
        "stats": {"batch_size": 100, "workers": 0, "checkpoint_batches": 10},
        "synthesis": {
            "ipc": 1,
            "batch_size": 100,
            "checkpoint_every": 100,
            "checkpoint_seconds": 0,
            "params": {"iterations": 2},
        },
        "labels": {"epochs": 2, "batch_size": 50},
        "validation": {
            "arch": "small_resnet",
            "students": 1,
            "epochs": 2,
            "checkpoint_every_epochs": 10,
            "full_data_epochs": 2,
        },
    }


def run_ours(root: Path, data: Path) -> dict:
    """Our stages, then (where this checkout has it) our hard protocol on the same images, the
    random-real baseline and the full data: our side of the comparison, in fractions."""
    from tasks.stages import STAGES, baseline_real, validate

    ours: dict = {}
    with open_run(str(root), parse_config(tiny_config(data))) as run:
        t0 = time.time()
        for name in ("data", "teachers", "stats", "synthesis", "labels", "validation"):
            STAGES[name](run)
        baseline_real(run)
        ours["stages_seconds"] = time.time() - t0
        ours["soft"] = {
            "distilled": read_summary(run.fs)["mean"],  # type: ignore[index]
            "random_real": read_summary(run.fs, BASELINE)["mean"],  # type: ignore[index]
        }
        if "protocol" not in inspect.signature(validate).parameters:
            ours["hard"] = {"skipped": "tasks.stages.validation.validate has no protocol yet"}
            return ours
        t0 = time.time()
        for prefix in ("", BASELINE, FULL_DATA):
            validate(run, prefix=prefix, protocol="hard")
        ours["hard"] = {
            "distilled": read_summary(run.fs, "", "hard")["mean"],  # type: ignore[index]
            "random_real": read_summary(run.fs, BASELINE, "hard")["mean"],  # type: ignore[index]
            "full_data": read_summary(run.fs, FULL_DATA, "hard")["mean"],  # type: ignore[index]
            "seconds": time.time() - t0,
        }
    return ours


LOADER_CHECK = """
import json, sys
import numpy as np
from torchvision import datasets
from ddranking.utils import get_dataset
export, data = sys.argv[1], sys.argv[2]
rec = json.load(open(export + "/export.json"))
ch, im, mean, std, n, train, test, _, cmap, _ = get_dataset(
    rec["dataset"], data, (rec["image_size"],) * 2, False, None, "cpu")
syn = datasets.ImageFolder(export + "/" + rec["image_dir"])  # as its evaluators read image_path
rows = [int(p.rsplit("/", 1)[1].split(".")[0]) for p, _ in syn.samples]
px = np.stack([np.asarray(syn.loader(p), dtype=np.uint8) for p, _ in syn.samples])
np.save(sys.argv[3], px)
print(json.dumps({"num_classes": n, "train": len(train), "val": len(test),
    "classes": len(syn.classes), "images": len(syn), "targets": syn.targets, "rows": rows}))
"""


def _meta(arch="resnet18", size=32, low_res=True, width=64, chans=3) -> dict:
    return {"arch": arch, "image_size": size, "low_res": low_res, "width": width, "in_chans": chans}


def test_teacher_mapping_loads_our_resnets_into_ddranking_model_and_refuses_the_rest():
    """Fast: the state_dict of our low-res ResNet-18 (and small_resnet at width 64) loads,
    strict, into the model DD-Ranking builds for the exported name; the rest say why not."""
    from d3s_core.models import build_model

    for arch, size, low_res in (("resnet18", 32, True), ("small_resnet", 64, True)):
        name = teacher_name(_meta(arch, size, low_res))
        assert name == "ResNet-18-BN"
        ours = build_model(arch, 7, low_res=low_res, width=64).state_dict()
        ddranking_resnet(name, 7, size).load_state_dict(ours)  # strict: same keys and shapes
    assert teacher_name(_meta("resnet34", 224, False)) == "ResNet-34-BN"
    for bad, why in (
        (_meta("small_resnet", width=4), "no DD-Ranking counterpart"),
        (_meta("timm:resnet10t"), "no DD-Ranking counterpart"),
        (_meta(chans=1), "input channels"),
        (_meta(size=48), "stem"),
    ):
        with pytest.raises(TeacherNotExpressible, match=why):
            teacher_name(bad)


def test_pixels_round_trip_within_half_a_level():
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    px = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    x = (px.float() / 255 + torch.rand(px.shape) * 0.9 / 255 - m) / s  # off the grid by < 1
    got = torch.from_numpy(to_pixels(x, mean, std)).permute(0, 3, 1, 2).float() / 255
    assert (got - (x * s + m)).abs().max() <= 0.5 / 255 + 1e-6


@pytest.mark.slow
@pytest.mark.external  # builds DD-Ranking's own venv from PyPI (minutes): opt-in
def test_export_is_read_and_evaluated_by_ddranking(tmp_path):
    py = ddranking_python()
    data = tiny_imagenet_tree(tmp_path / "data")
    ours = run_ours(tmp_path / "run", data)

    fs = RunFS(str(tmp_path / "run"))
    meta = json.loads(fs.read_bytes("teachers/teacher_0.json"))
    assert teacher_name(meta) == "ResNet-18-BN"  # torchvision resnet18 with the 3x3 stem
    t0 = time.time()
    rec = export_ddranking(tmp_path / "run", tmp_path / "export", "distilled")
    export_seconds = time.time() - t0
    assert rec["teacher"]["exported"] and rec["images"] == CLASSES and rec["ipc"] == 1
    assert (tmp_path / "export/teachers/TinyImageNet/ResNet-18-BN/ckpt_best.pt").is_file()
    assert not list(tmp_path.glob(".export.tmp-*"))  # atomic: nothing left beside it

    # Their loaders read what we wrote: its dataset, and the ImageFolder its evaluators build.
    got = subprocess.run(
        [py, "-c", LOADER_CHECK, tmp_path / "export", data, tmp_path / "px.npy"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert got.returncode == 0, got.stderr[-3000:]
    loaded = json.loads(got.stdout.strip().splitlines()[-1])
    assert (loaded["num_classes"], loaded["classes"], loaded["images"]) == (CLASSES,) * 3
    assert (loaded["train"], loaded["val"]) == (
        CLASSES * TRAIN_PER_CLASS,
        CLASSES * VAL_PER_CLASS,
    )
    images, classes = read_images(fs, "synthesis/images.zarr")
    rows = loaded["rows"]
    assert loaded["targets"] == classes[rows].tolist()  # its label c is our class c
    mean = torch.tensor(rec["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(rec["std"]).view(1, -1, 1, 1)
    ours_px = (images[rows] * std + mean).clamp(0, 1)  # (N, C, H, W) in [0, 1]
    theirs = torch.from_numpy(np.load(tmp_path / "px.npy")).permute(0, 3, 1, 2) / 255.0
    assert (theirs - ours_px).abs().max().item() <= 1 / 255 + 1e-6

    # Their evaluators, on CPU, tiny epochs.
    t0 = time.time()
    result_path = tmp_path / "ddranking.json"
    ev = subprocess.run(
        [
            py,
            REPO / "tools" / "ddranking_eval.py",
            tmp_path / "export",
            data,
            *DDR_ARGS,
            "--out",
            result_path,
            "--workdir",
            tmp_path / "ddr-work",
        ],
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=tmp_path,  # it writes ./results and ./random_data where not told otherwise
    )
    assert ev.returncode == 0, (ev.stdout[-3000:], ev.stderr[-5000:])
    theirs_json = json.loads(result_path.read_text())
    assert theirs_json["loaded"]["num_classes"] == CLASSES
    hard = theirs_json["hard"]["accuracies"]
    assert set(hard) == {"distilled", "full_data", "random_real"}
    for calls in hard.values():
        assert all(0.0 <= c["top1_percent"] <= 100.0 for c in calls)
    soft = theirs_json["soft"]["accuracies"]["soft"]
    assert set(soft) == {"distilled", "random_real"}
    assert all(0.0 <= c["top1_percent"] <= 100.0 for calls in soft.values() for c in calls)
    assert 0.0 <= theirs_json["hard"]["scores_fractions"]["lrs"] <= 1.0

    side_by_side = {
        "ours_fractions": ours,
        "ddranking_percent": {
            "hard": {k: [c["top1_percent"] for c in v] for k, v in hard.items()},
            "soft": {k: [c["top1_percent"] for c in v] for k, v in soft.items()},
            "hard_scores_ddranking": theirs_json["hard"]["scores_ddranking"],
            "hard_scores_fractions": theirs_json["hard"]["scores_fractions"],
            "soft_scores_ddranking": theirs_json["soft"]["scores_ddranking"],
            "soft_scores_fractions": theirs_json["soft"]["scores_fractions"],
            "best_lr": {k: [c["lr"] for c in v] for k, v in hard.items()},
        },
        "seconds": {
            "ours_stages": ours["stages_seconds"],
            "export": export_seconds,
            "ddranking_evaluators": time.time() - t0,
            "ddranking_hard": theirs_json["hard"]["seconds"],
            "ddranking_soft": theirs_json["soft"]["seconds"],
        },
        "teacher_held_out_top1": meta.get("held_out_top1"),
    }
    text = json.dumps(side_by_side, indent=1)
    print(text)
    out = os.environ.get("D3S_DDRANKING_REPORT")
    if out:
        Path(out).write_text(text)
    # Our hard figures are fractions, theirs percent: the same quantity, in [0, 1] vs [0, 100].
    if "distilled" in ours["hard"]:
        assert 0.0 <= ours["hard"]["distilled"] <= 1.0
