"""Wide residual networks (Zagoruyko & Komodakis 2016) for CIFAR: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2.

Pre-activation blocks; parameter names match the published CIFAR-100 checkpoints of mdistiller / RepDistiller.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..common import ZooModel, fan_out_normal_init

__all__ = ["BasicBlock", "NetworkBlock", "WideResNet", "wrn", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"]


def _bn_without_stat_update(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``bn(x)`` with the same output as a regular call, but leaving the running statistics untouched."""
    use_batch_stats = bn.training or bn.running_mean is None
    return F.batch_norm(
        x,
        None if use_batch_stats else bn.running_mean,
        None if use_batch_stats else bn.running_var,
        bn.weight,
        bn.bias,
        use_batch_stats,
        0.0,
        bn.eps,
    )


class BasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus identity or 1x1 projection shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.droprate = drop_rate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (
            None
            if self.equalInOut
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        out = self.conv2(out)
        # With a projection the shortcut starts from the activated input, otherwise from the raw input.
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class NetworkBlock(nn.Module):
    """A group of ``nb_layers`` WRN blocks; only the first one changes width / resolution."""

    def __init__(
        self, nb_layers: int, in_planes: int, out_planes: int, block: type[BasicBlock], stride: int, drop_rate: float
    ) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                block(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(nb_layers)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(ZooModel):
    """WRN-depth-k for 32x32 inputs (depth = 6n + 4)."""

    def __init__(self, depth: int, num_classes: int = 100, widen_factor: int = 1, drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], BasicBlock, 1, drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], BasicBlock, 2, drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], BasicBlock, 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3], num_classes)
        self.nChannels = channels[3]
        self.stage_channels = channels[1:]

        fan_out_normal_init(self, linear_std=None)

    def get_feat_modules(self) -> nn.ModuleList:
        """Modules producing the intermediate features, in order."""
        return nn.ModuleList([self.conv1, self.block1, self.block2, self.block3])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The BN applied (before a ReLU) to each stage output: next stage's first BN, then the final BN."""
        return [self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f2 = self.block2(f1)
        f3 = self.block3(f2)
        out = self.relu(self.bn1(f3))
        pooled = F.avg_pool2d(out, 8).reshape(-1, self.nChannels)
        logits = self.fc(pooled)
        # Pre-activations are the stage outputs after the BN that precedes the next ReLU (as in mdistiller).
        pre = [_bn_without_stat_update(bn, f) for bn, f in zip(self.get_bn_before_relu(), (f1, f2, f3))]
        feats = {"feats": [f0, f1, f2, f3], "preact_feats": [f0, *pre], "pooled_feat": pooled, "prepool": out}
        return logits, feats


def wrn(depth: int, widen_factor: int, num_classes: int = 100, **kwargs: Any) -> WideResNet:
    """Generic WRN-depth-widen_factor."""
    return WideResNet(depth=depth, num_classes=num_classes, widen_factor=widen_factor, **kwargs)


def wrn_40_2(num_classes: int = 100, **kwargs: Any) -> WideResNet:
    """WRN-40-2."""
    return WideResNet(depth=40, num_classes=num_classes, widen_factor=2, **kwargs)


def wrn_40_1(num_classes: int = 100, **kwargs: Any) -> WideResNet:
    """WRN-40-1."""
    return WideResNet(depth=40, num_classes=num_classes, widen_factor=1, **kwargs)


def wrn_16_2(num_classes: int = 100, **kwargs: Any) -> WideResNet:
    """WRN-16-2."""
    return WideResNet(depth=16, num_classes=num_classes, widen_factor=2, **kwargs)


def wrn_16_1(num_classes: int = 100, **kwargs: Any) -> WideResNet:
    """WRN-16-1."""
    return WideResNet(depth=16, num_classes=num_classes, widen_factor=1, **kwargs)
