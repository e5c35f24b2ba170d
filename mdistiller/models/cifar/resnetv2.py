"""ImageNet-style ResNets adapted to 32x32 inputs (3x3 stem, no max-pool): ResNet18/34/50/101/152.

Parameter names match the published CIFAR-100 checkpoints of mdistiller / RepDistiller.
"""

from __future__ import annotations

from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..common import ZooModel, kaiming_init, resnet_stage, run_stages

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "ResNet18", "ResNet34", "ResNet50", "ResNet101", "ResNet152"]


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """Identity (empty Sequential) or a strided 1x1 conv + BN projection."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs plus shortcut; returns ``(out, preact)``."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        preact = self.bn2(self.conv2(out)) + self.shortcut(x)
        return F.relu(preact), preact


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 bottleneck (expansion 4) plus shortcut; returns ``(out, preact)``."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        preact = self.bn3(self.conv3(out)) + self.shortcut(x)
        return F.relu(preact), preact


Block = Union[type[BasicBlock], type[Bottleneck]]


class ResNet(ZooModel):
    """Four-stage ResNet (64/128/256/512 base widths) for 32x32 inputs."""

    def __init__(
        self, block: Block, num_blocks: list[int], num_classes: int = 100, zero_init_residual: bool = False
    ) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512 * block.expansion, num_classes)
        self.stage_channels = [c * block.expansion for c in (64, 128, 256, 512)]

        kaiming_init(self)
        if zero_init_residual:  # each residual branch starts as zero (Goyal et al. 2017)
            for bn in self._last_bns(self.modules()):
                nn.init.constant_(bn.weight, 0)

    @staticmethod
    def _last_bns(blocks: Any) -> list[nn.BatchNorm2d]:
        return [
            b.bn3 if isinstance(b, Bottleneck) else b.bn2 for b in blocks if isinstance(b, (BasicBlock, Bottleneck))
        ]

    def _make_layer(self, block: Block, planes: int, num_blocks: int, stride: int) -> nn.Module:
        stage, self.in_planes = resnet_stage(block, self.in_planes, planes, num_blocks, stride, block.expansion)
        return stage

    def get_feat_modules(self) -> nn.ModuleList:
        """Modules producing the intermediate features, in order."""
        return nn.ModuleList([self.conv1, self.bn1, self.layer1, self.layer2, self.layer3, self.layer4])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The BN layer right before the final ReLU of each stage."""
        return self._last_bns(layer[-1] for layer in (self.layer1, self.layer2, self.layer3, self.layer4))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        f0 = F.relu(self.bn1(self.conv1(x)))
        outs, preacts = run_stages(f0, (self.layer1, self.layer2, self.layer3, self.layer4))
        avg = self.avgpool(outs[-1]).flatten(1)
        feats = {"feats": [f0, *outs], "preact_feats": [f0, *preacts], "pooled_feat": avg, "prepool": outs[-1]}
        return self.linear(avg), feats


def ResNet18(num_classes: int = 100, **kwargs: Any) -> ResNet:
    """ResNet-18 for 32x32 inputs."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, **kwargs)


def ResNet34(num_classes: int = 100, **kwargs: Any) -> ResNet:
    """ResNet-34 for 32x32 inputs."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, **kwargs)


def ResNet50(num_classes: int = 100, **kwargs: Any) -> ResNet:
    """ResNet-50 for 32x32 inputs."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, **kwargs)


def ResNet101(num_classes: int = 100, **kwargs: Any) -> ResNet:
    """ResNet-101 for 32x32 inputs."""
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes=num_classes, **kwargs)


def ResNet152(num_classes: int = 100, **kwargs: Any) -> ResNet:
    """ResNet-152 for 32x32 inputs."""
    return ResNet(Bottleneck, [3, 8, 36, 3], num_classes=num_classes, **kwargs)
