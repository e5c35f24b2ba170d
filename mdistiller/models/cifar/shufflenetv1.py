"""ShuffleNet V1 (Zhang et al. 2018) for 32x32 inputs: ``ShuffleV1`` (3 groups, 240/480/960 channels).

Parameter names match the published CIFAR-100 checkpoints of mdistiller / RepDistiller.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..common import Stage, ZooModel, run_stages

__all__ = ["Bottleneck", "ShuffleBlock", "ShuffleNet", "ShuffleV1", "channel_shuffle"]


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Channel shuffle: [N, g*c, H, W] -> [N, g, c, H, W] -> [N, c, g, H, W] -> [N, c*g, H, W]."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleBlock(nn.Module):
    """Module wrapper around :func:`channel_shuffle` (no parameters)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(x, self.groups)


class Bottleneck(nn.Module):
    """ShuffleNet unit: grouped 1x1 - shuffle - depthwise 3x3 - grouped 1x1; returns ``(out, preact)``.

    With stride 2 the shortcut is a 3x3 average pool concatenated to the branch (so ``out_planes`` is the
    branch width only); with stride 1 it is an identity added to the branch.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid_planes = out_planes // 4
        g = 1 if in_planes == 24 else groups  # the first unit sees the 24-channel stem: no grouping
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ShuffleBlock(groups=g)
        self.conv2 = nn.Conv2d(
            mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1, groups=mid_planes, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.shuffle1(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        preact = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return F.relu(preact), preact


class ShuffleNet(ZooModel):
    """ShuffleNet V1 for 32x32 inputs; ``cfg`` holds ``out_planes``, ``num_blocks`` and ``groups``."""

    def __init__(self, cfg: dict[str, Any], num_classes: int = 100) -> None:
        super().__init__()
        out_planes: list[int] = list(cfg["out_planes"])
        num_blocks: list[int] = list(cfg["num_blocks"])
        groups: int = cfg["groups"]
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.linear = nn.Linear(out_planes[2], num_classes)
        self.stage_channels = out_planes

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> Stage:
        layers = []
        for i in range(num_blocks):
            # The strided first unit concatenates its (pooled) input, so its branch is narrower.
            branch_planes = out_planes - self.in_planes if i == 0 else out_planes
            layers.append(Bottleneck(self.in_planes, branch_planes, stride=2 if i == 0 else 1, groups=groups))
            self.in_planes = out_planes
        return Stage(*layers)

    def get_feat_modules(self) -> nn.ModuleList:
        """Modules producing the intermediate features, in order."""
        return nn.ModuleList([self.conv1, self.bn1, self.layer1, self.layer2, self.layer3])

    def get_bn_before_relu(self) -> list[nn.Module]:
        """Not available: a stage's pre-activation is a concatenation / sum, not a single BN output."""
        raise NotImplementedError('ShuffleNet currently is not supported for "Overhaul" teacher')

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        f0 = F.relu(self.bn1(self.conv1(x)))
        outs, preacts = run_stages(f0, (self.layer1, self.layer2, self.layer3))
        pooled = F.avg_pool2d(outs[-1], 4).flatten(1)
        feats = {"feats": [f0, *outs], "preact_feats": [f0, *preacts], "pooled_feat": pooled, "prepool": outs[-1]}
        return self.linear(pooled), feats


def ShuffleV1(num_classes: int = 100, **kwargs: Any) -> ShuffleNet:
    """ShuffleNet V1, 3 groups, stages of 4/8/4 units with 240/480/960 channels."""
    cfg = {"out_planes": [240, 480, 960], "num_blocks": [4, 8, 4], "groups": 3}
    return ShuffleNet(cfg, num_classes=num_classes, **kwargs)
