"""Random-resized-crop + flip, drawn per image and applied from recorded parameters alone.

Parameters are a normalised crop box (x0, y0, x1, y1) in [0, 1] image coordinates and a flip
flag. Drawing uses a CPU torch.Generator, so the same seed gives the same parameters on every
device; applying is a differentiable bilinear resample (affine grid), so the same function
serves synthesis (gradients to the images), labelling and student training (replay).
Labelling replays quantised boxes (`quantise_boxes`, 1/65535 steps), the ones the label files
store exactly as uint16, so a student replays the very crop its label was computed on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "BOX_LEVELS",
    "LOG_RATIO",
    "apply_crops",
    "box_codes",
    "boxes_from_codes",
    "curriculum_scale",
    "draw_crops",
    "pixel_bounds",
    "quantise_boxes",
]

LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
BOX_LEVELS = 65535  # box coordinates are stored as uint16 q, x = q / BOX_LEVELS


def draw_crops(
    n: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    flip: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image random-resized-crop boxes and flips, as torchvision's RandomResizedCrop draws
    them (area fraction uniform in `scale`, log aspect ratio uniform in [log 3/4, log 4/3]),
    except that a box that would not fit is shrunk to fit instead of being redrawn.

    Returns boxes (n, 4) float32 [x0, y0, x1, y1] in [0, 1], flips (n,) bool.
    """
    u = torch.rand(n, 5, generator=generator, dtype=torch.float64)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    ratio = torch.exp(LOG_RATIO[0] + (LOG_RATIO[1] - LOG_RATIO[0]) * u[:, 1])
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    x0 = (1 - w) * u[:, 2]
    y0 = (1 - h) * u[:, 3]
    boxes = torch.stack([x0, y0, x0 + w, y0 + h], dim=1).float()
    flips = (u[:, 4] < 0.5) if flip else torch.zeros(n, dtype=torch.bool)
    return boxes, flips


def box_codes(boxes: torch.Tensor) -> torch.Tensor:
    """(N, 4) boxes in [0, 1] -> (N, 4) int32 codes q = round(clamp(x, 0, 1) * 65535).

    Computed in float64, so a box already on the grid gets its own code back."""
    return torch.round(boxes.double().clamp(0.0, 1.0) * BOX_LEVELS).to(torch.int32)


def boxes_from_codes(codes: torch.Tensor) -> torch.Tensor:
    """(N, 4) integer codes -> (N, 4) float32 boxes q / 65535 (one float32 division, so
    correctly rounded: every reader that divides in float32 gets the same bits)."""
    return codes.to(torch.float32) / BOX_LEVELS


def quantise_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """(N, 4) boxes in [0, 1] -> the nearest boxes on the uint16 grid, float32 q / 65535.

    Shifts each coordinate by at most 1/131070 (< 0.002 px at 224 px)."""
    return boxes_from_codes(box_codes(boxes))


def apply_crops(
    images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int | None = None
) -> torch.Tensor:
    """Crop each image to its box, resize to `size` (default: input size), flip where asked.

    images: (N, C, H, W); boxes: (N, 4) [x0, y0, x1, y1] in [0, 1]; flips: (N,) bool.
    Bilinear, differentiable with respect to `images`.
    """
    n, c, h, w = images.shape
    out_h, out_w = (h, w) if size is None else (size, size)
    boxes = boxes.to(images.device, torch.float32)
    sign = 1.0 - 2.0 * flips.to(images.device, torch.float32)
    theta = torch.zeros(n, 2, 3, device=images.device, dtype=torch.float32)
    # Output coordinate u in [-1, 1] maps to input x = (x0 + x1 - 1) + (x1 - x0) * u.
    theta[:, 0, 0] = (boxes[:, 2] - boxes[:, 0]) * sign
    theta[:, 0, 2] = boxes[:, 0] + boxes[:, 2] - 1
    theta[:, 1, 1] = boxes[:, 3] - boxes[:, 1]
    theta[:, 1, 2] = boxes[:, 1] + boxes[:, 3] - 1
    grid = F.affine_grid(theta, [n, c, out_h, out_w], align_corners=False)
    return F.grid_sample(
        images, grid.to(images.dtype), mode="bilinear", padding_mode="border", align_corners=False
    )


def curriculum_scale(
    iteration: int, iterations: int, final_min: float = 0.08, end_fraction: float = 1.0
) -> tuple[float, float]:
    """Crop-scale range at `iteration` (0-indexed) of `iterations`: the lower bound goes linearly
    from 1.0 (whole image) to `final_min`, reached after `end_fraction` of the iterations (CDA's
    easy-to-hard curriculum, App. D.3)."""
    progress = min(1.0, (iteration + 1) / max(1.0, end_fraction * iterations))
    return (1.0 - (1.0 - final_min) * progress, 1.0)


def pixel_bounds(
    mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (lo, hi), each (1, C, 1, 1): where pixels [0, 1] land in normalised space."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (0 - m) / s, (1 - m) / s
