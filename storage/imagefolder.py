"""ImageFolder trees (the ImageNet layout `train/<class>/*.JPEG`, and a separate validation tree
with the same class folders), streamed from disk.

Every image is read, converted and resized here, with errors that name the file: an unreadable
file, an image mode that cannot become the model's channels, a degenerate size (a missing root
or an empty class folder: storage/folder_tree.py, which lists the tree). A run lists a tree
once, into its dataset index (storage/dataset_index.py); the datasets here read that listing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import functional as TF

from d3s_core.dataprofile import CROP_RATIO_IMAGENET, GREY_MODES

from .dataset_index import FolderListing

# Re-exported for tasks/plan.py, which still takes them from here (storage/folder_tree.py
# lists trees without importing torch).
from .folder_tree import IMAGE_EXTENSIONS as IMAGE_EXTENSIONS
from .folder_tree import class_folders as class_folders

RGB_CONVERTIBLE = {"RGB", "L", "P", "CMYK", "RGBA", "LA", "YCbCr"}
MIN_SIDE = 8
# ImageNet's evaluation transform: the short side resized to size * 8/7 (256 for 224), then a
# centre crop. A run whose images already share one short side uses 1.0 (no resampling).
CROP_RATIO = CROP_RATIO_IMAGENET


def decode_image(
    source: str | os.PathLike[str] | IO[bytes],
    where: str,
    in_chans: int,
    to_grey: bool = False,
) -> Image.Image:
    """The image in `source` (a path or a binary file), decoded and converted to `in_chans`
    channels. in_chans 3: greyscale, palette, CMYK and alpha images become RGB (grey replicated
    into the three channels; ImageNet has all of them). in_chans 1: greyscale images are read as
    they are; a colour image is converted by ITU-R 601-2 luma (PIL's "L": 0.299 R + 0.587 G +
    0.114 B) when `to_grey` (`dataset.channels: 1` declared), and refused otherwise (a run whose
    images were detected as greyscale). Errors name `where`."""
    try:
        img = Image.open(source)
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{where}: unreadable image ({e})") from None
    if min(img.size) < MIN_SIDE:
        raise ValueError(
            f"{where}: image is {img.size[0]}x{img.size[1]} px, smaller than "
            f"{MIN_SIDE} px on a side"
        )
    if in_chans == 3:
        if img.mode not in RGB_CONVERTIBLE:
            raise ValueError(f"{where}: image mode {img.mode!r} cannot be read as RGB")
        return img.convert("RGB") if img.mode != "RGB" else img
    if in_chans == 1:
        if img.mode in GREY_MODES:
            return img.convert("L")
        if to_grey and img.mode in RGB_CONVERTIBLE:
            return img.convert("RGB").convert("L")
        raise ValueError(
            f"{where}: image mode {img.mode!r} is a colour image, but this run's images and "
            "models have 1 channel (detected from the sampled training images, all greyscale); "
            "set dataset.channels: 3 to read every image as RGB (greyscale replicated), or "
            "dataset.channels: 1 to convert colour images to grey (ITU-R 601-2 luma)"
        )
    raise ValueError(f"{in_chans} input channels are not supported for image files")


def image_header(source: str | os.PathLike[str] | IO[bytes], where: str) -> tuple[str, int, int]:
    """(mode, width, height) of an image from its header, without decoding its pixels."""
    try:
        with Image.open(source) as img:
            return img.mode, img.size[0], img.size[1]
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{where}: unreadable image ({e})") from None


def _fit(img: Image.Image, size: int, crop_ratio: float = CROP_RATIO) -> Image.Image:
    """The short side resized to round(size * crop_ratio) (left as it is when it already has
    that length), then centre-cropped to `size`."""
    side = round(size * crop_ratio)
    if min(img.size) != side:
        img = TF.resize(img, side)
    return TF.center_crop(img, [size, size])


def model_input(
    img: Image.Image,
    size: int,
    mean: list[float],
    std: list[float],
    crop_ratio: float = CROP_RATIO,
) -> torch.Tensor:
    """(C, size, size) float32 in normalised space: the short side resized to
    size * crop_ratio, then centre-cropped to `size`."""
    return TF.normalize(TF.to_tensor(_fit(img, size, crop_ratio)), mean, std)


def pixels(img: Image.Image, size: int, crop_ratio: float = CROP_RATIO) -> torch.Tensor:
    """(C, size, size) uint8: `model_input` before normalisation (storage.datasets.normalise
    turns it into model_input's tensor, bit for bit)."""
    return TF.pil_to_tensor(_fit(img, size, crop_ratio))


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images resized (short side to size * crop_ratio) and centre-cropped to `size`,
    normalised.

    in_chans 3: greyscale, palette, CMYK and alpha images are converted to RGB (ImageNet has
    all of them); in_chans 1: greyscale images, and colour ones converted by luma when
    `to_grey` (`decode_image`).

    `listing`: the tree's files (storage.dataset_index.FolderListing), memory-mapped from the
    run's dataset index; without it the tree is listed now, into memory.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        size: int,
        in_chans: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        expect_classes: list[str] | None = None,
        listing: FolderListing | None = None,
        crop_ratio: float = CROP_RATIO,
        to_grey: bool = False,
    ):
        self.root = Path(root)
        self.crop_ratio, self.to_grey = crop_ratio, to_grey
        if listing is None:
            listing = FolderListing.scan(self.root)
        self.listing = listing
        self.classes = listing.classes
        if expect_classes is not None and self.classes != expect_classes:
            missing = sorted(set(expect_classes) - set(self.classes))[:5]
            extra = sorted(set(self.classes) - set(expect_classes))[:5]
            raise ValueError(
                f"{self.root}: class folders differ from the training tree's "
                f"(missing {missing}, unexpected {extra})"
            )
        self.size, self.in_chans = size, in_chans
        self.mean, self.std = list(mean), list(std)

    def __len__(self) -> int:
        return len(self.listing)

    def fingerprint(self) -> str:
        """`storage.folder_tree.tree_fingerprint` of the tree as it was listed (the index's,
        when it came from one: the files are not stat'ed again)."""
        return self.listing.fingerprint

    def load(self, i: int) -> Image.Image:
        path = self.root / self.listing.path(i)
        return decode_image(path, str(path), self.in_chans, self.to_grey)

    def headers(self, indices: Sequence[int]) -> list[tuple[str, int, int, str]]:
        """[(mode, width, height, file)] of samples `indices`, from the image headers only."""
        out = []
        for i in indices:
            path = str(self.root / self.listing.path(i))
            out.append((*image_header(path, path), path))
        return out

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.load(i)
        x = model_input(img, self.size, self.mean, self.std, self.crop_ratio)
        return x, self.listing.class_of(i)

    def pixel_items(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        """[((C, size, size) uint8, class)] of samples `indices` (storage.datasets.PixelItems)."""
        return [
            (pixels(self.load(i), self.size, self.crop_ratio), self.listing.class_of(i))
            for i in indices
        ]
