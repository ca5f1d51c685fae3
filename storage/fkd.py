"""Export a run's images and labels in the FKD layout that SRe2L-style evaluators read.

    OUT/train/{class:05d}/{image_index:08d}.png   the images: an ImageFolder tree (uint8 PNG)
    OUT/fkd/epoch_{e}/batch_{b}.tar               one file per FKD epoch and batch
    OUT/export.json                               what was exported, from where, how to use it

Each batch file is `torch.save([coords, flip_status, mix_index, mix_lam, mix_bbox, soft_label])`
as SRe2L's `relabel/generate_soft_label.py` (`save()`) writes it: coords (B, 4) float32
(i/H, j/W, h/H, w/W) of RandomResizedCropWithCoords, flip_status (B,) bool, the mixing record,
soft_label (B, C) float16 (or float32). Row p of batch b of epoch e belongs to the p-th image of
that batch as train_FKD.py draws it: a RandomSampler with a generator seeded `--fkd_seed` (42),
iterated once per epoch, cut into batches of `--batch-size` (`get_img2batch_idx_list` in
`relabel/utils_fkd.py`). Our epochs use other permutations, but our crops, flips and labels are
per image, so each FKD batch takes, for each of its images, that image's row of our epoch
`e mod E` (E labelled epochs). We never mix images, so the mixing record is the identity
(mix_index arange(B), mix_lam 1.0, mix_bbox [0, 0, 0, 0]): CutMix and MixUp then leave the
images unchanged, and SRe2L's patched data-loader fetcher, which calls `mix_index.cpu()`, works;
`mix="none"` writes None x 3 instead, as generate_soft_label.py does with `--mix-type None`.

This is a pickle format, written only because it is what the peers' loaders read. Nothing in
this pipeline reads it back; our own labels stay Parquet (storage/labels.py). The files hold
only tensors, Python numbers, lists and None, so `torch.load(weights_only=True)` opens them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from d3s_core.labelling import EpochLabels

from .arrays import _open_group
from .fs import RunFS
from .labels import read_epoch
from .manifest import CorruptArtifact, Manifest
from .run import images_of, labels_epoch

FKD_SEED = 42  # train_FKD.py --fkd_seed default; generate_soft_label.py --fkd-seed 42
FKD_BATCH = 1024  # relabel.sh -b 1024, train_FKD.py --batch-size 1024
MixRecord = Literal["identity", "none"]


def fkd_epoch_batches(
    n: int, batch_size: int, epochs: int, seed: int = FKD_SEED
) -> Iterator[list[list[int]]]:
    """Per FKD epoch, the ImageFolder indices of each batch, drawn as train_FKD.py's DataLoader
    draws them: one RandomSampler over n images with a generator seeded `seed`, iterated once
    per epoch (so epoch e continues the generator of epoch e - 1), batches kept whole at the
    end (drop_last=False)."""
    g = torch.Generator()
    g.manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(range(n), generator=g)
    batches = torch.utils.data.BatchSampler(sampler, batch_size, drop_last=False)
    for _ in range(epochs):
        yield list(batches)


def folder_order(classes: torch.Tensor) -> torch.Tensor:
    """(N,) our image index at each position of torchvision's ImageFolder over the exported
    tree: class folders in sorted order, files sorted by name ({image_index:08d}.png)."""
    n = len(classes)
    return torch.argsort(classes.long() * n + torch.arange(n))


def fkd_coords(boxes: torch.Tensor) -> torch.Tensor:
    """(B, 4) [x0, y0, x1, y1] normalised boxes -> RandomResizedCropWithCoords' coords
    (i/H, j/W, h/H, w/W) = (y0, x0, y1 - y0, x1 - x0), float32."""
    x0, y0, x1, y1 = boxes.float().unbind(1)
    return torch.stack([y0, x0, y1 - y0, x1 - x0], dim=1)


def batch_record(
    lab: EpochLabels, rows: torch.Tensor, mix: MixRecord = "identity", fp16: bool = True
) -> list[Any]:
    """The FKD list for the rows `rows` of `lab`, in that order."""
    b = len(rows)
    soft = lab.logits[rows].float()
    return [
        fkd_coords(lab.boxes[rows]).contiguous(),
        lab.flips[rows].bool().contiguous(),
        torch.arange(b, dtype=torch.int64) if mix == "identity" else None,
        1.0 if mix == "identity" else None,
        [0, 0, 0, 0] if mix == "identity" else None,
        (soft.half() if fp16 else soft).contiguous(),
    ]


def to_pixels(images: torch.Tensor, mean: list[float], std: list[float]) -> np.ndarray:
    """(N, C, H, W) normalised images -> (N, H, W, C) uint8, rounded and clipped."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    px = ((images.float() * s + m).clamp(0, 1) * 255).round().to(torch.uint8)
    return px.permute(0, 2, 3, 1).numpy()


def _replace_from_tmp(tmp_dir: str, target: str, write: Any) -> None:
    """Write with `write(path)` to a file in `tmp_dir`, then rename it to `target`: a killed
    export never leaves a half file under a name the peers' loaders list."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, suffix=os.path.splitext(target)[1])
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _label_epochs(fs: RunFS, prefix: str) -> int:
    names = [d for d in fs.listdir(f"{prefix}labels") if d.startswith("epoch=")]
    epochs = sorted(int(d.removeprefix("epoch=")) for d in names)
    if not epochs or epochs != list(range(len(epochs))):
        raise CorruptArtifact(f"{fs.url(prefix + 'labels')}: epochs {epochs}, not 0..E-1")
    return len(epochs)


def export_fkd(
    fs: RunFS,
    labels_prefix: str,
    out_dir: str | os.PathLike[str],
    batch_size: int = FKD_BATCH,
    epochs: int | None = None,
    seed: int = FKD_SEED,
    fp16: bool = True,
    mix: MixRecord = "identity",
    verify: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the images and labels under `labels_prefix` ("" for the distilled set,
    "baselines/random-real/" for the baseline) to the local directory `out_dir` in the FKD
    layout; returns what export.json holds. `epochs`: FKD epochs to write (default: our
    labelled epochs E); FKD epoch e holds our epoch e mod E. `verify`: check every file read
    against the run's manifest first."""
    out = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out) and os.listdir(out):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty (overwrite=True replaces its export)")
        for name in ("train", "fkd", ".partial"):
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)
        if os.path.exists(os.path.join(out, "export.json")):
            os.unlink(os.path.join(out, "export.json"))
    label_epochs = _label_epochs(fs, labels_prefix)
    epochs = label_epochs if epochs is None else epochs
    if verify:
        manifest = Manifest(fs)
        manifest.verify(images_of(labels_prefix))
        for e in range(min(epochs, label_epochs)):
            manifest.verify(labels_epoch(e, labels_prefix))

    g = _open_group(fs, images_of(labels_prefix), "r")
    images = torch.from_numpy(np.asarray(g["images"][:]))  # type: ignore[index]
    classes = torch.from_numpy(np.asarray(g["classes"][:]))  # type: ignore[index]
    pixels = to_pixels(images, list(g.attrs["mean"]), list(g.attrs["std"]))  # type: ignore[arg-type]
    n = len(images)
    tmp_dir = os.path.join(out, ".partial")
    os.makedirs(tmp_dir, exist_ok=True)
    for i in range(n):
        img = Image.fromarray(pixels[i][..., 0] if pixels.shape[-1] == 1 else pixels[i])
        path = os.path.join(out, "train", f"{int(classes[i]):05d}", f"{i:08d}.png")
        _replace_from_tmp(tmp_dir, path, lambda p, img=img: img.save(p, format="PNG"))

    order = folder_order(classes)
    lab: EpochLabels | None = None
    num_classes = 0
    for e, batches in enumerate(fkd_epoch_batches(n, batch_size, epochs, seed)):
        if lab is None or lab.epoch != e % label_epochs:
            lab = read_epoch(fs, labels_epoch(e % label_epochs, labels_prefix), e % label_epochs)
            if not torch.equal(lab.image_index.sort().values, torch.arange(n)):
                raise CorruptArtifact(
                    f"{fs.url(labels_epoch(lab.epoch, labels_prefix))}: does not label each "
                    f"of the {n} images exactly once"
                )
            row_of = torch.empty(n, dtype=torch.int64)
            row_of[lab.image_index] = torch.arange(len(lab.image_index))
            num_classes = lab.logits.shape[1]
        for b, idx in enumerate(batches):
            record = batch_record(lab, row_of[order[torch.tensor(idx)]], mix, fp16)
            path = os.path.join(out, "fkd", f"epoch_{e}", f"batch_{b}.tar")
            _replace_from_tmp(tmp_dir, path, lambda p, r=record: torch.save(r, p))
    os.rmdir(tmp_dir)

    info = {
        "layout": "fkd",
        "source": fs.url(f"{labels_prefix}labels"),
        "images": n,
        "image_size": list(images.shape[1:]),
        "classes": num_classes,
        "batch_size": batch_size,
        "fkd_epochs": epochs,
        "label_epochs": label_epochs,
        "epoch_map": "fkd/epoch_{e} holds labels/epoch={e mod label_epochs}",
        "fkd_seed": seed,
        "soft_label_dtype": "float16" if fp16 else "float32",
        "mix_record": mix,
        "torch": torch.__version__,
        "train_dir": os.path.join(out, "train"),
        "fkd_path": os.path.join(out, "fkd") + os.sep,
        "sre2l_train_fkd": (
            f"python train_FKD.py --batch-size {batch_size} --epochs {epochs} "
            f"--fkd_seed {seed} "
            f"--train-dir {os.path.join(out, 'train')} --fkd-path {os.path.join(out, 'fkd')}/ "
            "--val-dir /path/to/imagenet/val --model resnet18 --cos -T 20 "
            "--output-dir ./save/d3s"
        ),
    }
    with open(os.path.join(out, "export.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m storage.fkd",
        description="Export a run's images and labels in SRe2L's FKD layout (for peers' code).",
    )
    ap.add_argument("root", help="run root (path or fsspec URL)")
    ap.add_argument("out", help="local output directory (empty or new)")
    ap.add_argument("--prefix", default="", help='labels prefix, e.g. "baselines/random-real/"')
    ap.add_argument("--batch-size", type=int, default=FKD_BATCH)
    ap.add_argument("--epochs", type=int, default=None, help="FKD epochs (default: ours)")
    ap.add_argument(
        "--fkd-seed",
        type=int,
        default=FKD_SEED,
        help="sampler seed (default 42; SRe2L's loader finds batches with 42 whatever its "
        "--fkd_seed says, so other seeds are for other readers)",
    )
    ap.add_argument("--fp32", action="store_true", help="float32 soft labels (default fp16)")
    ap.add_argument("--mix", choices=["identity", "none"], default="identity")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    if args.fkd_seed != FKD_SEED:
        print(
            f"warning: --fkd-seed {args.fkd_seed}: SRe2L's train_FKD.py looks batches up with "
            f"seed {FKD_SEED} whatever its --fkd_seed is (utils_fkd.get_img2batch_idx_list), so "
            "it stops with a KeyError on this export; other readers are fine",
            file=sys.stderr,
        )
    info = export_fkd(
        RunFS(args.root),
        args.prefix,
        args.out,
        batch_size=args.batch_size,
        epochs=args.epochs,
        seed=args.fkd_seed,
        fp16=not args.fp32,
        mix=args.mix,
        overwrite=args.overwrite,
    )
    json.dump(info, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
