"""ImageNet ResNet18/34/50/101/152 whose state dicts are torchvision's, key for key and shape for shape.

torchvision's ImageNet weight files (`resnet34-b627a593.pth`, `resnet50-0676ba61.pth`, ...) load strictly and give
torchvision's logits. Like the CIFAR zoo, `forward` returns `(logits, feats)`:
`feats["feats"]` = [stem, stage1, stage2, stage3, stage4] after ReLU (the stem before max-pooling, as mdistiller),
`feats["preact_feats"]` = the same before their last ReLU, `feats["pooled_feat"]` = the pooled B x D feature,
`feats["prepool"]` = the map it pools (stage 4's output).
"""

from __future__ import annotations

from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..common import ZooModel, kaiming_init, resnet_stage, run_stages

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "ResNet18", "ResNet34", "ResNet50", "ResNet101", "ResNet152"]


def _downsample(in_planes: int, out_planes: int, stride: int) -> nn.Sequential | None:
    """torchvision's projection shortcut (`downsample.0` conv 1x1, `downsample.1` BN), or None for identity."""
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs plus shortcut (stride on the first conv); returns ``(out, preact)``."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(in_planes, planes * self.expansion, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        preact = self.bn2(self.conv2(out)) + identity
        return F.relu(preact), preact


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here, torchvision's "ResNet v1.5") -> 1x1 (x4) plus shortcut; returns ``(out, preact)``."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = _downsample(in_planes, planes * self.expansion, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        preact = self.bn3(self.conv3(out)) + identity
        return F.relu(preact), preact


Block = Union[type[BasicBlock], type[Bottleneck]]


class ResNet(ZooModel):
    """torchvision's ImageNet ResNet (7x7 stem, max-pool, four stages, global average pool, `fc`)."""

    # upstream's get_stage_channels lists no stem (hard-coded [256, 512, 1024, 2048]) and its get_bn_before_relu
    # returns layers 2-4 only: its OFD distils stages 2-4 of these models (see ZooModel)
    ofd_first_stage = 1

    def __init__(self, block: Block, layers: list[int], num_classes: int = 1000,
                 zero_init_residual: bool = False) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], stride=1)
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self.stage_channels = [c * block.expansion for c in (64, 128, 256, 512)]

        kaiming_init(self)
        if zero_init_residual:  # each residual branch starts as zero (Goyal et al. 2017)
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.constant_(m.last_bn.weight, 0)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int) -> nn.Module:
        stage, self.in_planes = resnet_stage(block, self.in_planes, planes, blocks, stride, block.expansion)
        return stage

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The BN right before the final ReLU of each stage (its last block's last BN)."""
        return [layer[-1].last_bn for layer in (self.layer1, self.layer2, self.layer3, self.layer4)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        stem_pre = self.bn1(self.conv1(x))
        stem = F.relu(stem_pre)
        outs, preacts = run_stages(self.maxpool(stem), (self.layer1, self.layer2, self.layer3, self.layer4))
        pooled = torch.flatten(self.avgpool(outs[-1]), 1)
        feats = {"feats": [stem, *outs], "preact_feats": [stem_pre, *preacts], "pooled_feat": pooled,
                 "prepool": outs[-1]}
        return self.fc(pooled), feats


def ResNet18(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-18 (torchvision's resnet18 weights: `resnet18-f37072fd.pth`)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, **kwargs)


def ResNet34(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-34 (torchvision's `resnet34-b627a593.pth`, top-1 73.31)."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, **kwargs)


def ResNet50(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-50 (torchvision's `resnet50-0676ba61.pth`, top-1 76.13; V2 `resnet50-11ad3fa6.pth` 80.86)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, **kwargs)


def ResNet101(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-101."""
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes=num_classes, **kwargs)


def ResNet152(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-152."""
    return ResNet(Bottleneck, [3, 8, 36, 3], num_classes=num_classes, **kwargs)
