"""Importing teacher weights from existing checkpoint files: safetensors, or a torchvision /
timm state dict saved with torch.save, from a local path or any fsspec URL.

Nothing here can run code from the file: safetensors has no code, and torch.load is called with
weights_only=True, which refuses pickled objects other than tensors and plain containers.
"""

from __future__ import annotations

import io

import fsspec
import torch
from safetensors.torch import load as st_load


def read_state_dict(url: str) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} state dict from `url` (.safetensors, or .pt/.pth/.bin/.tar)."""
    try:
        with fsspec.open(url, "rb") as f:
            blob = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: teacher checkpoint not found") from None
    if url.endswith(".safetensors"):
        try:
            return dict(st_load(blob))
        except Exception as e:
            raise ValueError(f"{url}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{url}: not a weights-only PyTorch checkpoint ({e})") from None
    for key in ("state_dict", "model", "model_state_dict", "ema"):  # common wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{url}: expected a state dict of tensors")
    prefix = "module."  # DataParallel / DDP checkpoints
    return {k.removeprefix(prefix): v for k, v in obj.items()}


def load_into(
    model: torch.nn.Module, state: dict[str, torch.Tensor], url: str, allow_new_head: bool = False
) -> list[str]:
    """Load `state` into `model`, with errors that name the file. allow_new_head: a classifier
    of another class count is skipped (fine-tuning from other weights, e.g. ImageNet-1K ->
    21K); returns the names left at their initialisation."""
    own = model.state_dict()
    skipped = []
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            if (
                allow_new_head
                and own[k].dim() <= 2
                and k.split(".")[0] in ("fc", "head", "classifier")
            ):
                skipped.append(k)
                continue
            if v.dim() == 4 and v.shape[0] == own[k].shape[0] and v.shape[2:] == own[k].shape[2:]:
                have, want = int(v.shape[1]), int(own[k].shape[1])
                if {have, want} <= {1, 3}:
                    rule = (
                        "greyscale images replicated into RGB"
                        if have == 3
                        else "colour images converted to grey by ITU-R 601-2 luma"
                    )
                    raise ValueError(
                        f"{url}: {k} takes {have}-channel images, but the run's data has "
                        f"{want} channel(s); set dataset.channels: {have} to read every image "
                        f"with {have} channel(s) ({rule})"
                    )
            raise ValueError(
                f"{url}: {k} has shape {tuple(v.shape)}, the model expects "
                f"{tuple(own[k].shape)} (different architecture or class count?)"
            )
    state = {k: v for k, v in state.items() if k not in skipped}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in skipped]
    if missing or unexpected:
        raise ValueError(
            f"{url}: does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return sorted(skipped)
