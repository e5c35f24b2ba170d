"""MobileNetV2 (Sandler et al. 2018) for 32x32 inputs; ``MobileNetV2`` in the zoo is the half-width model.

Parameter names match the published CIFAR-100 checkpoints of mdistiller / RepDistiller (``mobile_half``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..common import ZooModel, fan_out_normal_init

__all__ = ["InvertedResidual", "MobileNetV2", "mobilenetv2_T_w", "mobile_half"]


def conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    """3x3 conv - BN - ReLU."""
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def conv_1x1_bn(inp: int, oup: int) -> nn.Sequential:
    """1x1 conv - BN - ReLU."""
    return nn.Sequential(nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    """Pointwise expand - depthwise 3x3 - linear pointwise projection, with a residual when shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = inp * expand_ratio
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(ZooModel):
    """MobileNetV2 with expansion ``T`` and width multiplier ``width_mult``; ``feature_dim`` is the class count."""

    def __init__(
        self, T: int, feature_dim: int, input_size: int = 32, width_mult: float = 1.0, remove_avg: bool = False
    ) -> None:
        super().__init__()
        if input_size % 32 != 0:
            raise ValueError(f"input_size must be a multiple of 32, got {input_size}")
        self.remove_avg = remove_avg
        # t (expansion), c (channels), n (repeats), s (first stride)
        self.interverted_residual_setting = [
            [1, 16, 1, 1],
            [T, 24, 2, 1],
            [T, 32, 3, 2],
            [T, 64, 4, 2],
            [T, 96, 3, 1],
            [T, 160, 3, 2],
            [T, 320, 1, 1],
        ]

        input_channel = int(32 * width_mult)
        self.conv1 = conv_bn(3, input_channel, 2)
        self.blocks = nn.ModuleList([])
        for t, c, n, s in self.interverted_residual_setting:
            output_channel = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(input_channel, output_channel, stride, t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))

        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_1x1_bn(input_channel, self.last_channel)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, feature_dim))
        self.avgpool = nn.AvgPool2d(input_size // 16, ceil_mode=True)
        self.stage_channels = [int(c * width_mult) for c in (24, 32, 96, 320)]
        fan_out_normal_init(self)


    def get_bn_before_relu(self) -> list[nn.Module]:
        """The final (linear-bottleneck) BN of the blocks whose outputs are ``feats[1:]``."""
        return [self.blocks[i][-1].conv[-1] for i in (1, 2, 4, 6)]

    def get_feat_modules(self) -> nn.ModuleList:
        """Modules producing the intermediate features, in order."""
        return nn.ModuleList([self.conv1, self.blocks])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        f0 = self.conv1(x)
        f1 = self.blocks[1](self.blocks[0](f0))
        f2 = self.blocks[2](f1)
        f3 = self.blocks[4](self.blocks[3](f2))
        f4 = self.blocks[6](self.blocks[5](f3))
        prepool = self.conv2(f4)
        pooled = (prepool if self.remove_avg else self.avgpool(prepool)).flatten(1)
        logits = self.classifier(pooled)
        # Linear bottlenecks have no ReLU after their last BN, so there are no separate pre-activations.
        feats = {"feats": [f0, f1, f2, f3, f4], "preact_feats": None, "pooled_feat": pooled, "prepool": prepool}
        return logits, feats


def mobilenetv2_T_w(T: int, W: float, feature_dim: int = 100) -> MobileNetV2:
    """MobileNetV2 with expansion ``T`` and width multiplier ``W``."""
    return MobileNetV2(T=T, feature_dim=feature_dim, width_mult=W)


def mobile_half(num_classes: int = 100, **kwargs: Any) -> MobileNetV2:
    """Half-width MobileNetV2 (expansion 6, width 0.5) — the zoo's ``MobileNetV2``."""
    return MobileNetV2(T=6, feature_dim=num_classes, width_mult=0.5, **kwargs)
