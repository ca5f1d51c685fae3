"""Teacher and student networks: torchvision ResNets, their low-resolution variant, any timm
model by name, and a width-scaled small ResNet for CPU tests and the demo."""

from __future__ import annotations

import torchvision
from torch import nn
from torchvision.models import resnet as tv_resnet

__all__ = [
    "SmallResNet",
    "TORCHVISION_RESNETS",
    "build_model",
    "check_arch",
    "freeze",
]

TORCHVISION_RESNETS = {
    "resnet18": tv_resnet.resnet18,
    "resnet34": tv_resnet.resnet34,
    "resnet50": tv_resnet.resnet50,
    "resnet101": tv_resnet.resnet101,
}


class SmallResNet(tv_resnet.ResNet):
    """ResNet-18 layout (BasicBlock, [2, 2, 2, 2]) with base width `width` instead of 64.

    Module names match torchvision's (conv1, layer1.0.conv1, ..., fc), so layer selection,
    state dicts and hooks work the same way as on a real ResNet-18.
    """

    def __init__(self, num_classes: int, width: int = 16, layers: tuple[int, ...] = (2, 2, 2, 2)):
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(tv_resnet.BasicBlock, width, layers[0])
        self.layer2 = self._make_layer(tv_resnet.BasicBlock, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(tv_resnet.BasicBlock, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(tv_resnet.BasicBlock, 8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def _adapt_stem(model: nn.Module, in_chans: int, low_res: bool) -> None:
    """Replace the 7x7/stride-2 stem by a 3x3/stride-1 one and drop the max-pool (App. D.2,
    the Tiny-ImageNet variant), and/or change the number of input channels."""
    conv1 = model.conv1
    assert isinstance(conv1, nn.Conv2d)
    if low_res:
        model.conv1 = nn.Conv2d(in_chans, conv1.out_channels, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_chans != conv1.in_channels:
        model.conv1 = nn.Conv2d(in_chans, conv1.out_channels, 7, stride=2, padding=3, bias=False)
    new = model.conv1
    if new is not conv1:
        assert isinstance(new, nn.Conv2d)
        nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")


def build_model(
    arch: str,
    num_classes: int,
    *,
    in_chans: int = 3,
    low_res: bool = False,
    width: int = 16,
) -> nn.Module:
    """Build a classifier by name, randomly initialised.

    arch: "resnet18" | "resnet34" | "resnet50" | "resnet101" (torchvision V1),
          "small_resnet" (ResNet-18 layout at base width `width`), or "timm:<name>".
    low_res: 3x3 stride-1 stem without max-pool (the paper's 64 px variant); ResNets only.
    """
    if arch in TORCHVISION_RESNETS:
        model: nn.Module = TORCHVISION_RESNETS[arch](weights=None, num_classes=num_classes)
        _adapt_stem(model, in_chans, low_res)
        return model
    if arch == "small_resnet":
        model = SmallResNet(num_classes=num_classes, width=width)
        _adapt_stem(model, in_chans, low_res)
        return model
    if arch.startswith("timm:"):
        import timm  # ~0.4 s more to import; only timm:<name> architectures need it

        if low_res:
            raise ValueError(f"low_res is only defined for ResNets, not for {arch!r}")
        return timm.create_model(
            arch.removeprefix("timm:"), pretrained=False, num_classes=num_classes, in_chans=in_chans
        )
    check_arch(arch, low_res)
    if in_chans != 3:
        raise ValueError(
            f"torchvision model {arch!r} takes 3 input channels, the data has {in_chans}: set "
            "dataset.channels: 3 (greyscale replicated into RGB) or use a ResNet or a "
            "timm:<name> model, which take any channel count"
        )
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def check_arch(arch: str, low_res: bool | None = None, key: str = "arch") -> None:
    """Refuse an architecture name `build_model` cannot build (naming the config `key`):
    torchvision's ResNets, small_resnet, any torchvision classification model, timm:<name>
    (checked against timm's registry). low_res only for the ResNets."""
    if arch in TORCHVISION_RESNETS or arch == "small_resnet":
        return
    if arch.startswith("timm:"):
        import timm  # ~0.4 s more to import; only timm:<name> architectures need it

        if not timm.is_model(arch.removeprefix("timm:")):
            raise ValueError(f"{key}: {arch!r} is not a timm model name")
    else:
        names = torchvision.models.list_models(module=torchvision.models)
        if arch not in names:
            raise ValueError(
                f"{key}: unknown architecture {arch!r}; expected resnet18|34|50|101, "
                "small_resnet, a torchvision classification model (e.g. mobilenet_v3_small) "
                "or timm:<name>"
            )
    if low_res:
        raise ValueError(
            f"{key}: low_res (the 3x3 stem) is only defined for ResNets, not for {arch!r}; "
            "set model.low_res: false"
        )


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients: teachers during synthesis and labelling, where the
    gradient is needed for the images only."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
