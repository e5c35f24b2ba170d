"""VGG with batch norm for 32x32 inputs: vgg8, vgg11, vgg13, vgg16, vgg19.

Five conv blocks separated by max-pools, global average pooling and a single linear classifier.
Parameter names match the published CIFAR-100 checkpoints of mdistiller / RepDistiller (the ``*_bn`` variants).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..common import ZooModel, fan_out_normal_init

__all__ = ["VGG", "cfg", "vgg8", "vgg11", "vgg13", "vgg16", "vgg19"]

cfg: dict[str, list[list[int]]] = {
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
    "S": [[64], [128], [256], [512], [512]],
}


def _make_block(widths: list[int], batch_norm: bool, in_channels: int) -> nn.Sequential:
    """Conv3x3(-BN)-ReLU repeated; the trailing ReLU is left out (applied in ``VGG.forward``)."""
    layers: list[nn.Module] = []
    for width in widths:
        layers.append(nn.Conv2d(in_channels, width, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU(inplace=True))
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(ZooModel):
    """VGG over five blocks; ``cfg`` lists the conv widths of each block."""

    def __init__(self, cfg: list[list[int]], batch_norm: bool = True, num_classes: int = 100) -> None:
        super().__init__()
        in_channels = [3] + [block[-1] for block in cfg[:-1]]
        self.block0 = _make_block(cfg[0], batch_norm, in_channels[0])
        self.block1 = _make_block(cfg[1], batch_norm, in_channels[1])
        self.block2 = _make_block(cfg[2], batch_norm, in_channels[2])
        self.block3 = _make_block(cfg[3], batch_norm, in_channels[3])
        self.block4 = _make_block(cfg[4], batch_norm, in_channels[4])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(cfg[4][-1], num_classes)
        self.stage_channels = [block[-1] for block in cfg[1:]]
        fan_out_normal_init(self)


    def get_feat_modules(self) -> nn.ModuleList:
        """Modules producing the intermediate features, in order."""
        return nn.ModuleList(
            [
                self.block0,
                self.pool0,
                self.block1,
                self.pool1,
                self.block2,
                self.pool2,
                self.block3,
                self.pool3,
                self.block4,
                self.pool4,
            ]
        )

    def get_bn_before_relu(self) -> list[nn.Module]:
        """The last layer (BN when ``batch_norm``) of blocks 1-4, i.e. right before each stage's ReLU."""
        return [self.block1[-1], self.block2[-1], self.block3[-1], self.block4[-1]]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        h = x.shape[2]
        f0 = F.relu(self.block0(x))
        f1_pre = self.block1(self.pool0(f0))
        f1 = F.relu(f1_pre)
        f2_pre = self.block2(self.pool1(f1))
        f2 = F.relu(f2_pre)
        f3_pre = self.block3(self.pool2(f2))
        f3 = F.relu(f3_pre)
        # 32x32 inputs keep 4x4 maps for the last block; 64x64 inputs (Tiny-ImageNet) get one more pool.
        f4_pre = self.block4(self.pool3(f3) if h == 64 else f3)
        f4 = F.relu(f4_pre)
        pooled = self.pool4(f4).flatten(1)
        logits = self.classifier(pooled)
        feats = {
            "feats": [f0, f1, f2, f3, f4],
            "preact_feats": [f0, f1_pre, f2_pre, f3_pre, f4_pre],
            "pooled_feat": pooled,
            "prepool": f4,
        }
        return logits, feats


def vgg8(num_classes: int = 100, **kwargs: Any) -> VGG:
    """VGG-8 with batch norm (config ``S``)."""
    return VGG(cfg["S"], batch_norm=True, num_classes=num_classes, **kwargs)


def vgg11(num_classes: int = 100, **kwargs: Any) -> VGG:
    """VGG-11 with batch norm (config ``A``)."""
    return VGG(cfg["A"], batch_norm=True, num_classes=num_classes, **kwargs)


def vgg13(num_classes: int = 100, **kwargs: Any) -> VGG:
    """VGG-13 with batch norm (config ``B``)."""
    return VGG(cfg["B"], batch_norm=True, num_classes=num_classes, **kwargs)


def vgg16(num_classes: int = 100, **kwargs: Any) -> VGG:
    """VGG-16 with batch norm (config ``D``)."""
    return VGG(cfg["D"], batch_norm=True, num_classes=num_classes, **kwargs)


def vgg19(num_classes: int = 100, **kwargs: Any) -> VGG:
    """VGG-19 with batch norm (config ``E``)."""
    return VGG(cfg["E"], batch_norm=True, num_classes=num_classes, **kwargs)
