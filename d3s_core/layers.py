"""Which layers are measured (App. A.1) and forward hooks that capture their outputs."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "FeatureHooks",
    "default_measured_layers",
    "select_layers",
]


def default_measured_layers(model: nn.Module) -> list[str]:
    """Every convolution of the main path: all nn.Conv2d except residual shortcuts.

    For a torchvision ResNet-18 this is 17 layers, the stem conv plus the 16 convs inside the
    basic blocks; the three 1x1 `downsample` convs are excluded (App. A.1: "L = 17").
    Shortcut convs of timm models (`downsample`, `shortcut`) are excluded the same way.
    """
    names = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and not re.search(r"(^|\.)(downsample|shortcut)(\.|$)", name)
    ]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d layers to measure")
    return names


def select_layers(model: nn.Module, spec: str | Sequence[str] | None = None) -> list[str]:
    """Resolve a layer selection to module names, in model order.

    spec: None for the default (`default_measured_layers`); a list of module names; or a string
    regular expression matched (fullmatch) against the names of the model's nn.Conv2d modules.
    """
    if spec is None:
        return default_measured_layers(model)
    modules = dict(model.named_modules())
    if isinstance(spec, str):
        names = [
            n for n, m in modules.items() if isinstance(m, nn.Conv2d) and re.fullmatch(spec, n)
        ]
        if not names:
            raise ValueError(
                f"layer pattern {spec!r} matches no nn.Conv2d of {type(model).__name__}"
            )
        return names
    missing = [n for n in spec if n not in modules]
    if missing:
        raise ValueError(f"layers {missing} are not modules of {type(model).__name__}")
    order = {n: i for i, n in enumerate(modules)}
    return sorted(dict.fromkeys(spec), key=order.__getitem__)


class FeatureHooks:
    """Forward hooks that keep the latest output of each measured layer.

    Use as a context manager; `outputs` holds one entry per layer, in `names` order, after each
    forward pass. The tensors are kept in the autograd graph, so a loss on them backpropagates
    to the input images. With `reduce`, each output is replaced by `reduce(output)` inside the
    hook, so the activation can be freed as soon as the next layer has used it (the statistics
    pass keeps only sufficient statistics, never 17 activations).
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        reduce: Callable[[torch.Tensor], Any] | None = None,
    ):
        self.names = list(names)
        self.reduce = reduce
        self._slots: dict[str, Any] = {}
        modules = dict(model.named_modules())
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def hook(_module: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            self._slots[name] = out if self.reduce is None else self.reduce(out)

        return hook

    @property
    def outputs(self) -> list[Any]:
        missing = [n for n in self.names if n not in self._slots]
        if missing:
            raise RuntimeError(f"no forward pass reached layers {missing}")
        return [self._slots[n] for n in self.names]

    def clear(self) -> None:
        self._slots.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._slots.clear()

    def __enter__(self) -> FeatureHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
