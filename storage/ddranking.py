"""Export a run's image set in the layout DD-Ranking 0.2.0's evaluators read (issue 15).

    OUT/export.json                                 what was exported, from where, how
    OUT/images/{class:05d}/{row:07d}.png            the image set, an ImageFolder (`image_path`)
    OUT/teachers/{dataset}/{name}/ckpt_best.pt      a teacher state_dict (`teacher_dir`), if any

Class folders are named like DD-Ranking's own random-real sets (`{class_idx:05d}`, its
utils/data.py `get_random_data_path`): torchvision's ImageFolder numbers sorted folder names, so
folder c is label c, which is the run's class c, which is the c-th sorted class folder of the
dataset's own `train/` tree (storage/folder_tree.py `class_folders` sorts the same way). Pixels
are the stored normalised images mapped back by the store's `mean`/`std` attributes, clamped to
[0, 1] and rounded to uint8: a round trip is within 0.5/255 of the stored pixel (plus clamping).

Teachers: DD-Ranking's soft-label evaluator loads `ckpt_best.pt` with `torch.load(weights_only=
True)` into a model it builds by name. Our torchvision ResNet-18/34/50 (and `small_resnet` at
width 64, the same layout) are its `ResNet-{d}-BN` built with `tea_use_torchvision=True`, key for
key, when their stem is the one DD-Ranking gives that size (3x3, no max-pool, exactly at 32 and 64
px). Its other architectures (ConvNet at width 128, VGG, its own ResNets) have no counterpart in
our runs; a teacher that cannot be expressed is left out with the reason in export.json, and only
the hard-label evaluator (which builds its students from scratch and needs no teacher) can run.

    python -m storage.ddranking RUN_ROOT OUT [--set distilled|random-real|herding|k-center]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image
from safetensors.torch import load as st_load

from .arrays import _open_group, image_chunks, image_count
from .fs import RunFS
from .manifest import CorruptArtifact, Manifest
from .records import read_teacher_meta
from .run import baseline_prefix, images_of, teacher_weights

IMAGE_SETS = ("distilled", "random-real", "herding", "k-center")
FORMAT = "d3s-ddranking-export/1"
IMAGES_DIR = "images"
TEACHERS_DIR = "teachers"
# DD-Ranking's torchvision ResNets take the 3x3 stride-1 stem without max-pool at exactly these
# sizes (ddranking/utils/model.py get_resnet); our `low_res` stem is that one at any size.
LOW_RES_SIZES = (32, 64)
RESNET_DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50}


class TeacherNotExpressible(ValueError):
    """The run's teacher has no DD-Ranking architecture with the same state_dict."""


def store_of(image_set: str) -> str:
    """The image store (run-relative) of an image set."""
    if image_set not in IMAGE_SETS:
        raise ValueError(f"unknown image set {image_set!r}; expected one of {IMAGE_SETS}")
    return images_of("" if image_set == "distilled" else baseline_prefix(image_set))


def to_pixels(images: torch.Tensor, mean: list[float], std: list[float]) -> np.ndarray:
    """images: (B, C, H, W) float32 in normalised space -> (B, H, W, C) uint8 pixels,
    x * std + mean clamped to [0, 1], times 255, rounded to nearest."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    px = (images.float() * s + m).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    return px.permute(0, 2, 3, 1).contiguous().numpy()


def teacher_name(meta: dict[str, Any]) -> str:
    """DD-Ranking's model name (with `tea_use_torchvision=True`) whose state_dict is the teacher's
    key for key, or raise TeacherNotExpressible saying why."""
    arch, size = meta["arch"], int(meta["image_size"])
    if arch == "small_resnet" and int(meta.get("width") or 0) == 64:
        arch = "resnet18"  # the same layout and module names at torchvision's width
    why = None
    if arch not in RESNET_DEPTHS:
        why = (
            f"architecture {arch!r} (width {meta.get('width')}) has no DD-Ranking counterpart: "
            "its ConvNets are fixed at width 128, its ResNets at 64, its VGGs and AlexNet differ"
        )
    elif int(meta["in_chans"]) != 3:
        why = f"{meta['in_chans']} input channels; DD-Ranking's models take 3"
    elif bool(meta["low_res"]) != (size in LOW_RES_SIZES):
        why = (
            f"stem: ours is {'3x3' if meta['low_res'] else '7x7 + max-pool'} at {size} px, "
            f"DD-Ranking's torchvision ResNet uses 3x3 only at {LOW_RES_SIZES} px"
        )
    if why:
        raise TeacherNotExpressible(
            f"teacher ({meta['arch']}) cannot be exported as a DD-Ranking teacher: {why}. "
            "Run only its hard-label evaluator, or train a teacher of one of its architectures"
        )
    return f"ResNet-{RESNET_DEPTHS[arch]}-BN"


def ddranking_resnet(name: str, num_classes: int, image_size: int) -> torch.nn.Module:
    """The model DD-Ranking builds for `name` with use_torchvision=True (its get_resnet)."""
    depth = int(name.split("-")[1])
    model = getattr(torchvision.models, f"resnet{depth}")(num_classes=num_classes)
    if image_size in LOW_RES_SIZES:
        model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = torch.nn.Identity()
    return model


def _teacher_state(fs: RunFS, m: int) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    meta = read_teacher_meta(fs, m)
    name = teacher_name(meta)
    Manifest(fs).verify(teacher_weights(m))
    state = st_load(fs.read_bytes(teacher_weights(m)))
    # The mapping is the identity; check it against the model DD-Ranking will build.
    ddranking_resnet(name, int(meta["num_classes"]), int(meta["image_size"])).load_state_dict(state)
    return name, state, meta


def _class_counts(classes: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(classes, minlength=num_classes).tolist()


def export_ddranking(
    run_root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    image_set: str = "distilled",
    *,
    dataset: str = "TinyImageNet",
    teacher: int | None = 0,
    require_teacher: bool = False,
    chunk: int = 256,
    overwrite: bool = False,
    **storage_options: Any,
) -> dict[str, Any]:
    """Write OUT (a local directory, atomically: built beside it, then renamed) from the run at
    `run_root` (any RunFS URL). Streams `chunk` rows at a time. `teacher`: which teacher to
    export (None: none); one that DD-Ranking cannot express is skipped with its reason in the
    returned record, or raises TeacherNotExpressible when `require_teacher`. Returns the record
    written to OUT/export.json."""
    fs = RunFS(run_root, **storage_options)
    rel = store_of(image_set)
    Manifest(fs).verify(rel)  # finished and unchanged
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: exists (pass overwrite=True / --overwrite to replace it)")
    group = _open_group(fs, rel, "r")
    attrs: dict[str, Any] = dict(group.attrs)
    mean, std = [float(v) for v in attrs["mean"]], [float(v) for v in attrs["std"]]
    n, shape = image_count(fs, rel), tuple(group["images"].shape[1:])  # type: ignore[union-attr]
    classes = np.asarray(group["classes"][:])  # type: ignore[index]
    num_classes = int(attrs.get("num_classes") or classes.max() + 1)

    teacher_rec: dict[str, Any] = {"exported": False, "reason": "not asked (teacher=None)"}
    state = None
    if teacher is not None:
        try:
            name, state, meta = _teacher_state(fs, teacher)
            num_classes = max(num_classes, int(meta["num_classes"]))
            teacher_rec = {
                "exported": True,
                "index": teacher,
                "name": name,
                "use_torchvision": True,
                "arch": meta["arch"],
                "held_out_top1": meta.get("held_out_top1"),
            }
        except TeacherNotExpressible as e:
            if require_teacher:
                raise
            teacher_rec = {"exported": False, "index": teacher, "reason": str(e)}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for c in range(num_classes):
            (tmp / IMAGES_DIR / f"{c:05d}").mkdir(parents=True)
        row = 0
        mode = {1: "L", 3: "RGB"}[shape[0]]
        for x, y in image_chunks(fs, rel, chunk):
            if torch.isnan(x).any():
                raise ValueError(f"{fs.url(rel)}: rows {row}..{row + len(x)} hold unwritten rows")
            px = to_pixels(x, mean, std)
            for img, c in zip(px, y.tolist(), strict=True):
                path = tmp / IMAGES_DIR / f"{c:05d}" / f"{row:07d}.png"
                Image.fromarray(img[..., 0] if mode == "L" else img, mode).save(path)
                row += 1
        if state is not None:
            d = tmp / TEACHERS_DIR / dataset / teacher_rec["name"]
            d.mkdir(parents=True)
            torch.save(state, d / "ckpt_best.pt")
        counts = _class_counts(classes, num_classes)
        record = {
            "format": FORMAT,
            "run": fs.url(),
            "image_set": image_set,
            "store": rel,
            "dataset": dataset,
            "images": n,
            "num_classes": num_classes,
            "ipc": max(counts),
            "ipc_uniform": min(counts) == max(counts),
            "channels": shape[0],
            "image_size": shape[1],
            "mean": mean,
            "std": std,
            "pixels": "uint8 PNG, round(clamp(x * std + mean, 0, 1) * 255)",
            "image_dir": IMAGES_DIR,
            "class_folders": "{class:05d}, label c = run class c",
            "teacher_dir": TEACHERS_DIR if state is not None else None,
            "teacher": teacher_rec,
        }
        (tmp / "export.json").write_text(json.dumps(record, indent=1))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m storage.ddranking",
        description="Export a run's image set (and teacher) for DD-Ranking's evaluators.",
    )
    ap.add_argument("root", help="the run's root (a path or URL)")
    ap.add_argument("out", help="the directory to write (local)")
    ap.add_argument("--set", dest="image_set", default="distilled", choices=IMAGE_SETS)
    ap.add_argument("--dataset", default="TinyImageNet", help="DD-Ranking's dataset name")
    ap.add_argument("--teacher", type=int, default=0, help="teacher index to export")
    ap.add_argument("--no-teacher", action="store_true", help="export images only")
    ap.add_argument("--require-teacher", action="store_true")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    try:
        record = export_ddranking(
            a.root,
            a.out,
            a.image_set,
            dataset=a.dataset,
            teacher=None if a.no_teacher else a.teacher,
            require_teacher=a.require_teacher,
            overwrite=a.overwrite,
        )
    except (TeacherNotExpressible, CorruptArtifact, FileExistsError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
