"""ResNet backbones (He et al. 2016), torchvision's blocks and initialisation, with two options:

- the CIFAR stem used by SimCLR for small images (Chen et al. 2020, appendix B.9: 3x3 stride-1 first
  convolution, no max-pool);
- a channel-width multiplier (``--width_multiplier``): 0.25 gives base widths 16-32-64-128 instead of
  64-128-256-512, the feature dimension following (512 x w, times 4 for the bottleneck ResNets). It makes
  experiments affordable on a CPU; at 1.0 the network is torchvision's, weight for weight from the same seed
  (tests/test_models_data.py checks it).
"""
from __future__ import annotations

import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

BLOCKS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
}
BACKBONES = tuple(BLOCKS)

# FlatCLR's --model spellings.
ARCH_ALIASES = {f"res{d}": f"resnet{d}" for d in (18, 34, 50, 101, 152)}


def widths(width: float) -> list[int]:
    """Channels of the stem and the four stages at ``width`` (at least 1 each)."""
    return [max(1, round(c * width)) for c in (64, 64, 128, 256, 512)]


class ScaledResNet(ResNet):
    """torchvision's ResNet with every stage's width scaled; its ``__init__`` mirrors torchvision's, module by
    module and in the same order, so at width 1.0 the same seed gives the same weights."""

    def __init__(self, block: type[nn.Module], layers: list[int], width: float = 1.0) -> None:
        nn.Module.__init__(self)
        stem, *stages = widths(width)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = stem, 1, 1, 64
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, stages[0], layers[0])
        self.layer2 = self._make_layer(block, stages[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, stages[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, stages[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(stages[3] * block.expansion, 1000)  # as torchvision (its init draws from the stream)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def build_backbone(arch: str, cifar_stem: bool, width: float = 1.0) -> tuple[nn.Module, int]:
    """A randomly initialised ResNet without its classifier; returns (module, feature dim)."""
    block, layers = BLOCKS[ARCH_ALIASES.get(arch, arch)]
    net = ScaledResNet(block, layers, width)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, net.bn1.num_features, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    net.feat_dim = feat_dim  # recorded in checkpoints
    return net, feat_dim


def cifar_stem_for(setting: bool | None, image_size: int) -> bool:
    """``--cifar_stem`` as given, or by default the CIFAR stem for images of 64 px or less."""
    return setting if setting is not None else image_size <= 64
