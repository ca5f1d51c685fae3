"""Listing an ImageFolder tree (`train/<class>/*.JPEG`): its class folders and image files in
the sequential order, and their fingerprint. Plain os/pathlib (no torch): storage/dataset_index.py
lists trees through these into the run's dataset index; storage/imagefolder.py reads the images.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def class_folders(root: str | os.PathLike[str]) -> list[str]:
    """Names of the class folders under `root`, sorted (hidden folders left out)."""
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: dataset folder does not exist")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{base}: no class folders (expected {base}/<class>/<image files>)")
    return classes


def class_files(root: str | os.PathLike[str], name: str) -> list[str]:
    """Image files of class folder `name` (any depth), as paths relative to `root`, in the
    order of sorted `Path`s (component by component, not as strings)."""
    base = Path(root)
    files = sorted(
        f for f in (base / name).rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise ValueError(
            f"{base / name}: class folder holds no image files "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return [str(f.relative_to(base)) for f in files]


def scan_tree(root: str | os.PathLike[str]) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names sorted, samples [(relative path, class index)] sorted). A Python list of
    every file: storage.dataset_index lists a tree class by class into Arrow columns instead."""
    classes = class_folders(root)
    return classes, [(rel, c) for c, name in enumerate(classes) for rel in class_files(root, name)]


def tree_fingerprint(root: str | os.PathLike[str], samples: list[tuple[str, int]]) -> str:
    """Hash of every file's relative path, size and class: changes when the data does."""
    h = hashlib.sha256()
    base = Path(root)
    for rel, c in samples:
        h.update(f"{rel}\0{(base / rel).stat().st_size}\0{c}\n".encode())
    return "imagefolder:" + h.hexdigest()
