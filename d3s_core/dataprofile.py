"""A dataset's shape and normalisation, found from its images: which images to inspect, the
channel and size rules, and exact per-channel pixel moments. Pure: the caller reads the images
(storage/, tasks/stages/profile.py) and passes their headers and pixels in."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import torch

# Image modes that hold one channel (alpha dropped): decoded as greyscale.
__all__ = [
    "CROP_RATIO_IMAGENET",
    "GREY_MODES",
    "HeaderSummary",
    "PixelMoments",
    "infer_channels",
    "infer_size",
    "profile_rows",
]

GREY_MODES = frozenset({"1", "L", "LA"})
CROP_RATIO_IMAGENET = 8 / 7


def profile_rows(n: int, cap: int, seed: int) -> np.ndarray:
    """Rows of an n-sample training set to inspect: all when n <= cap, else a seeded uniform
    sample of `cap` rows without replacement, ascending (so a sequential reader reads them
    shard by shard). int64."""
    if n <= cap:
        return np.arange(n, dtype=np.int64)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:cap].sort().values.numpy().astype(np.int64)


@dataclass
class HeaderSummary:
    """What the headers of the inspected images say: modes and short sides."""

    modes: Counter[str] = field(default_factory=Counter)
    short_sides: list[int] = field(default_factory=list)
    square: bool = True
    first_colour: str | None = None  # a file whose mode is a colour one

    def add(self, headers: Iterable[tuple[str, int, int, str]]) -> None:
        for mode, w, h, where in headers:
            self.modes[mode] += 1
            self.short_sides.append(min(w, h))
            self.square &= w == h
            if mode not in GREY_MODES and self.first_colour is None:
                self.first_colour = where

    @property
    def count(self) -> int:
        return len(self.short_sides)

    def as_json(self) -> dict[str, object]:
        s = self.short_sides
        return {
            "images": self.count,
            "modes": dict(sorted(self.modes.items())),
            "short_side": (
                {"min": min(s), "median": statistics.median_low(s), "max": max(s)} if s else None
            ),
            "all_square": self.square,
        }


def infer_channels(h: HeaderSummary) -> tuple[int, str]:
    """(channels, why): 1 when every inspected image is greyscale, else 3 (greyscale images are
    then replicated into RGB, as ImageNet's are)."""
    if h.count and all(m in GREY_MODES for m in h.modes):
        return 1, f"all {h.count} inspected images are greyscale ({', '.join(sorted(h.modes))})"
    return 3, (
        f"colour images among the {h.count} inspected (modes {dict(sorted(h.modes.items()))}; "
        f"e.g. {h.first_colour}); greyscale ones are replicated into RGB"
    )


def infer_size(h: HeaderSummary, fallback: int, fallback_from: str) -> tuple[int, float, str]:
    """(image_size, crop_ratio, why). Every inspected image sharing one short side s: size s,
    crop ratio 1 (no resampling; only a non-square image's long side is centre-cropped).
    Otherwise `fallback` (the preset's size) with ImageNet's rule: short side to size * 8/7,
    centre crop."""
    sides = set(h.short_sides)
    if len(sides) == 1:
        (s,) = sides
        shape = "square " if h.square else ""
        return s, 1.0, f"all {h.count} inspected images are {shape}{s} px on the short side"
    lo, hi = min(sides), max(sides)
    return (
        fallback,
        CROP_RATIO_IMAGENET,
        (
            f"short sides vary ({lo}..{hi} px, median {statistics.median_low(h.short_sides)}): "
            f"{fallback_from}'s {fallback} px, short side resized to {fallback} * 8/7 and "
            "centre-cropped"
        ),
    )


class PixelMoments:
    """Exact per-channel sums of uint8 pixels and of their squares (float64 sums of integers
    below 2**53: exact, so any order of batches gives the same result), and the pixel count.
    mean and std (population, ddof 0) of pixel / 255, as torchvision's normalisation uses."""

    def __init__(self, channels: int):
        self.channels = channels
        self.n = 0
        self.sums = [0] * channels
        self.squares = [0] * channels

    def update(self, pixels: torch.Tensor) -> None:
        """pixels: (B, C, H, W) uint8."""
        if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[1] != self.channels:
            raise ValueError(
                f"expected (B, {self.channels}, H, W) uint8 pixels, got "
                f"{tuple(pixels.shape)} {pixels.dtype}"
            )
        for chunk in pixels.split(16):
            x = chunk.to(torch.float64).transpose(0, 1).reshape(self.channels, -1)
            s, q = x.sum(1), (x * x).sum(1)  # integers < 2**53: 16 images of up to 90 Mpx
            for c in range(self.channels):
                self.sums[c] += int(s[c])
                self.squares[c] += int(q[c])
            self.n += x.shape[1]

    def merge(self, other: PixelMoments) -> None:
        self.n += other.n
        for c in range(self.channels):
            self.sums[c] += other.sums[c]
            self.squares[c] += other.squares[c]

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if not self.n:
            raise ValueError("no pixels measured")
        n = self.n
        mean = tuple(float(Fraction(s, 255 * n)) for s in self.sums)
        var = [
            Fraction(n * q - s * s, (255 * n) ** 2)
            for s, q in zip(self.sums, self.squares, strict=True)
        ]
        return mean, tuple(math.sqrt(v) for v in var)
