"""bfloat16 autocast, channels_last and torch.compile for the teachers' forward passes.

Only the network runs in bfloat16. The measured activations are cast to float32 before their
moments are taken (`batch_moments` and `SuffStats.from_batch` turn autocast off), so the
covariances, Eq. 1's Cholesky solves and log-determinants, and the cross-entropy stay
float32/float64, and the images and Adam state stay float32. "off" adds no context at all, so
the default path is the same code as before these switches existed.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from torch import nn

__all__ = [
    "CompiledForward",
    "autocast_off",
    "enable_cudnn_autotune",
    "network_autocast",
    "to_channels_last",
]

AutocastMode = Literal["off", "bf16"]


def network_autocast(device_type: str, mode: AutocastMode) -> contextlib.AbstractContextManager:
    """The context a teacher's forward runs in: nothing for "off", torch.autocast to bfloat16
    for "bf16" (on CUDA and on CPU, which supports bf16 autocast too)."""
    if mode == "off":
        return contextlib.nullcontext()
    if mode == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    raise ValueError(f"unknown autocast mode {mode!r}; expected 'off' or 'bf16'")


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled on `device_type` (statistics are never taken in bf16/fp16). Devices
    without autocast (the "meta" device the device-placement tests use) need no context."""
    if device_type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def enable_cudnn_autotune(device: torch.device | str) -> None:
    """On CUDA, let cuDNN time its convolution algorithms once per input shape and keep the
    fastest (`torch.backends.cudnn.benchmark`): every stage feeds fixed batch shapes (one more
    for a last, shorter batch). Nothing elsewhere. It changes which kernels run, not the maths;
    note that with autocast off CUDA convolutions run in TF32 by default
    (`torch.backends.cudnn.allow_tf32`), so CUDA and CPU results agree to TF32 rounding."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True


def to_channels_last(model: nn.Module) -> nn.Module:
    """The model's 4-D weights in channels_last (NHWC), in place: with channels_last inputs,
    cuDNN's NHWC kernels run without layout conversions (and the tensor cores' bf16 path)."""
    return model.to(memory_format=torch.channels_last)


class CompiledForward:
    """torch.compile of a module's forward, with forward hooks on its submodules traced into
    the graph. Compilation happens on the first call (tens of seconds; again for a new input
    shape or grad mode); a compiler failure there is re-raised as a RuntimeError that says how
    to turn compilation off, never hidden behind a silent fallback to eager."""

    def __init__(self, model: nn.Module):
        if not hasattr(torch, "compile"):
            raise RuntimeError(f"torch {torch.__version__} has no torch.compile; set compile=False")
        self.module = model
        self._compiled = torch.compile(model)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self._compiled(x)
        except torch._dynamo.exc.TorchDynamoException as e:
            raise RuntimeError(
                f"torch.compile of {type(self.module).__name__} failed "
                f"({type(e).__name__}); set compile=False to run it eagerly"
            ) from e
