"""mdistiller's Tiny-ImageNet MobileNetV2 (`mobilenetv2_tinyimagenet`): full width, 64x64 inputs.

Not the CIFAR zoo's half-width model: a 1x1 stem with padding 1 (64 px in, 66 px out), three stride-2 stages
(66 -> 33 -> 17 -> 9), biased convolutions, ReLU6, and a 1x1 convolution as the classifier on the pooled feature.
Parameter names match mdistiller's (`pre`, `stage1` ... `stage7`, `conv1`, `conv2`), so its checkpoints load.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..common import ZooModel

__all__ = ["LinearBottleNeck", "TinyMobileNetV2", "mobilenetv2_tinyimagenet"]


class LinearBottleNeck(nn.Module):
    """Expand 1x1 (x t) - depthwise 3x3 (stride) - project 1x1, no ReLU after the projection; identity shortcut
    when the stride is 1 and the channels are unchanged. All three convolutions carry a bias (as mdistiller's)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, t: int = 6) -> None:
        super().__init__()
        hidden = in_channels * t
        self.residual = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_channels, 1),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual(x)
        return out + x if self.shortcut else out


def _stage(repeat: int, in_channels: int, out_channels: int, stride: int, t: int) -> nn.Sequential:
    """`repeat` bottlenecks, the first changing channels and stride."""
    blocks = [LinearBottleNeck(in_channels, out_channels, stride, t)]
    blocks += [LinearBottleNeck(out_channels, out_channels, 1, t) for _ in range(repeat - 1)]
    return nn.Sequential(*blocks)


class TinyMobileNetV2(ZooModel):
    """MobileNetV2 for 64x64 inputs; `forward -> (logits, feats)` with feats = [stem, stage2, stage3, stage4, head]
    (mdistiller's five), no pre-activations (linear bottlenecks), and the pooled 1280-d feature flattened to B x 1280
    (mdistiller returns it as B x 1280 x 1 x 1). PyTorch's default initialisation, as in mdistiller."""

    def __init__(self, num_classes: int = 200) -> None:
        super().__init__()
        self.pre = nn.Sequential(nn.Conv2d(3, 32, 1, padding=1), nn.BatchNorm2d(32), nn.ReLU6(inplace=True))
        self.stage1 = LinearBottleNeck(32, 16, 1, 1)
        self.stage2 = _stage(2, 16, 24, 2, 6)
        self.stage3 = _stage(3, 24, 32, 2, 6)
        self.stage4 = _stage(4, 32, 64, 2, 6)
        self.stage5 = _stage(3, 64, 96, 1, 6)
        self.stage6 = _stage(3, 96, 160, 1, 6)
        self.stage7 = LinearBottleNeck(160, 320, 1, 6)
        self.conv1 = nn.Sequential(nn.Conv2d(320, 1280, 1), nn.BatchNorm2d(1280), nn.ReLU6(inplace=True))
        self.conv2 = nn.Conv2d(1280, num_classes, 1)
        self.stage_channels = [24, 32, 64, 1280]

    def classifier_layer(self) -> nn.Conv2d:
        """The 1x1 conv that classifies the pooled feature."""
        return self.conv2

    def get_feat_modules(self) -> nn.ModuleList:
        """Modules producing the intermediate features, in order."""
        return nn.ModuleList([self.pre, self.stage1, self.stage2, self.stage3, self.stage4, self.stage5,
                              self.stage6, self.stage7, self.conv1])

    def get_bn_before_relu(self) -> list[nn.Module]:
        """The BN that ends each block giving `feats[1:]` (a linear bottleneck's projection; the head's BN)."""
        return [self.stage2[-1].residual[-1], self.stage3[-1].residual[-1], self.stage4[-1].residual[-1],
                self.conv1[1]]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        f0 = self.pre(x)
        f1 = self.stage2(self.stage1(f0))
        f2 = self.stage3(f1)
        f3 = self.stage4(f2)
        f4 = self.conv1(self.stage7(self.stage6(self.stage5(f3))))
        pooled = F.adaptive_avg_pool2d(f4, 1)
        logits = self.conv2(pooled).flatten(1)
        feats = {"feats": [f0, f1, f2, f3, f4], "preact_feats": None, "pooled_feat": pooled.flatten(1), "prepool": f4}
        return logits, feats


def mobilenetv2_tinyimagenet(num_classes: int = 200, **kwargs: Any) -> TinyMobileNetV2:
    """The zoo's Tiny-ImageNet `MobileNetV2` (mdistiller's builder name)."""
    return TinyMobileNetV2(num_classes=num_classes, **kwargs)
