"""ResNet backbones (He et al. 2016) from torchvision, with the CIFAR stem used by SimCLR for small
images (Chen et al. 2020, appendix B.9: 3x3 stride-1 first convolution, no max-pool)."""
from __future__ import annotations

import torch.nn as nn
import torchvision

BACKBONES = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
    "resnet152": torchvision.models.resnet152,
}

# FlatCLR's --model spellings.
ARCH_ALIASES = {f"res{d}": f"resnet{d}" for d in (18, 34, 50, 101, 152)}


def build_backbone(arch: str, cifar_stem: bool) -> tuple[nn.Module, int]:
    """A randomly initialised ResNet without its classifier; returns (module, feature dim)."""
    net = BACKBONES[ARCH_ALIASES.get(arch, arch)](weights=None)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feat_dim
