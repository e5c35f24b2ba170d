"""CIFAR ResNets (He et al. 2016, the 6n+2 family): resnet8 ... resnet110, resnet8x4, resnet32x4.

Parameter names match the published CIFAR-100 teacher checkpoints of mdistiller / RepDistiller.
"""

from __future__ import annotations

from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..common import Stage, ZooModel, kaiming_init, run_stages

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "Stage",
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet8x4",
    "resnet32x4",
]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity / projection shortcut; returns ``(out, preact)``."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        preact = self.bn2(self.conv2(out)) + residual
        return F.relu(preact), preact


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 bottleneck (expansion 4); returns ``(out, preact)``."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        preact = self.bn3(self.conv3(out)) + residual
        return F.relu(preact), preact


Block = Union[type[BasicBlock], type[Bottleneck]]


class ResNet(ZooModel):
    """CIFAR ResNet with three stages at 32x32, 16x16 and 8x8 resolution.

    Args:
        depth: total depth, ``6n + 2`` for basic blocks or ``9n + 2`` for bottlenecks.
        num_filters: channels of the stem and of the three stages (before block expansion).
        block_name: ``"basicblock"`` or ``"bottleneck"``.
        num_classes: size of the classifier output.
    """

    def __init__(
        self, depth: int, num_filters: list[int], block_name: str = "basicblock", num_classes: int = 100
    ) -> None:
        super().__init__()
        block: Block
        if block_name.lower() == "basicblock":
            if (depth - 2) % 6 != 0:
                raise ValueError(f"basic-block depth must be 6n+2 (e.g. 20, 32, 56, 110), got {depth}")
            n, block = (depth - 2) // 6, BasicBlock
        elif block_name.lower() == "bottleneck":
            if (depth - 2) % 9 != 0:
                raise ValueError(f"bottleneck depth must be 9n+2 (e.g. 29, 47, 56, 110), got {depth}")
            n, block = (depth - 2) // 9, Bottleneck
        else:
            raise ValueError(f"block_name must be 'basicblock' or 'bottleneck', got {block_name!r}")

        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, num_filters[1], n)
        self.layer2 = self._make_layer(block, num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(block, num_filters[3], n, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(num_filters[3] * block.expansion, num_classes)
        self.stage_channels = [c * block.expansion for c in num_filters[1:]]

        kaiming_init(self)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1) -> Stage:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return Stage(*layers)

    def get_feat_modules(self) -> nn.ModuleList:
        """Modules producing the intermediate features, in order."""
        return nn.ModuleList([self.conv1, self.bn1, self.relu, self.layer1, self.layer2, self.layer3])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The BN layer right before the final ReLU of each stage."""
        last = [layer[-1] for layer in (self.layer1, self.layer2, self.layer3)]
        return [b.bn3 if isinstance(b, Bottleneck) else b.bn2 for b in last]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        f0 = self.relu(self.bn1(self.conv1(x)))  # 32x32
        outs, preacts = run_stages(f0, (self.layer1, self.layer2, self.layer3))  # 32x32, 16x16, 8x8
        avg = self.avgpool(outs[-1]).flatten(1)
        feats = {"feats": [f0, *outs], "preact_feats": [f0, *preacts], "pooled_feat": avg, "prepool": outs[-1]}
        return self.fc(avg), feats


def resnet8(num_classes: int = 100, **kwargs: Any) -> ResNet:
    """ResNet-8 (16/16/32/64 channels)."""
    return ResNet(8, [16, 16, 32, 64], "basicblock", num_classes=num_classes, **kwargs)


def resnet14(num_classes: int = 100, **kwargs: Any) -> ResNet:
    """ResNet-14 (16/16/32/64 channels)."""
    return ResNet(14, [16, 16, 32, 64], "basicblock", num_classes=num_classes, **kwargs)


def resnet20(num_classes: int = 100, **kwargs: Any) -> ResNet:
    """ResNet-20 (16/16/32/64 channels)."""
    return ResNet(20, [16, 16, 32, 64], "basicblock", num_classes=num_classes, **kwargs)


def resnet32(num_classes: int = 100, **kwargs: Any) -> ResNet:
    """ResNet-32 (16/16/32/64 channels)."""
    return ResNet(32, [16, 16, 32, 64], "basicblock", num_classes=num_classes, **kwargs)


def resnet44(num_classes: int = 100, **kwargs: Any) -> ResNet:
    """ResNet-44 (16/16/32/64 channels)."""
    return ResNet(44, [16, 16, 32, 64], "basicblock", num_classes=num_classes, **kwargs)


def resnet56(num_classes: int = 100, **kwargs: Any) -> ResNet:
    """ResNet-56 (16/16/32/64 channels)."""
    return ResNet(56, [16, 16, 32, 64], "basicblock", num_classes=num_classes, **kwargs)


def resnet110(num_classes: int = 100, **kwargs: Any) -> ResNet:
    """ResNet-110 (16/16/32/64 channels)."""
    return ResNet(110, [16, 16, 32, 64], "basicblock", num_classes=num_classes, **kwargs)


def resnet8x4(num_classes: int = 100, **kwargs: Any) -> ResNet:
    """ResNet-8 with 4x wider stages (32/64/128/256 channels)."""
    return ResNet(8, [32, 64, 128, 256], "basicblock", num_classes=num_classes, **kwargs)


def resnet32x4(num_classes: int = 100, **kwargs: Any) -> ResNet:
    """ResNet-32 with 4x wider stages (32/64/128/256 channels)."""
    return ResNet(32, [32, 64, 128, 256], "basicblock", num_classes=num_classes, **kwargs)
