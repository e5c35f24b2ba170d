"""ShuffleNet V2 (Ma et al. 2018) for 32x32 inputs: ``ShuffleV2`` (1x, 116/232/464 channels).

Parameter names match the published CIFAR-100 checkpoints of mdistiller / RepDistiller.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..common import Stage, ZooModel, run_stages
from .shufflenetv1 import ShuffleBlock

__all__ = ["BasicBlock", "DownBlock", "ShuffleNetV2", "ShuffleV2", "SplitBlock", "configs"]

configs: dict[float, dict[str, tuple[int, ...]]] = {
    0.2: {"out_channels": (40, 80, 160, 512), "num_blocks": (3, 3, 3)},
    0.3: {"out_channels": (40, 80, 160, 512), "num_blocks": (3, 7, 3)},
    0.5: {"out_channels": (48, 96, 192, 1024), "num_blocks": (3, 7, 3)},
    1: {"out_channels": (116, 232, 464, 1024), "num_blocks": (3, 7, 3)},
    1.5: {"out_channels": (176, 352, 704, 1024), "num_blocks": (3, 7, 3)},
    2: {"out_channels": (224, 488, 976, 2048), "num_blocks": (3, 7, 3)},
}


class SplitBlock(nn.Module):
    """Split channels into the first ``ratio`` fraction and the rest."""

    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.ratio = ratio

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = int(x.size(1) * self.ratio)
        return x[:, :c], x[:, c:]


class BasicBlock(nn.Module):
    """Stride-1 unit: split, 1x1 - dw 3x3 - 1x1 on one half, concat, shuffle; returns ``(out, preact)``.

    ``preact`` is the concatenation before the last ReLU and before the shuffle (as in mdistiller).
    """

    def __init__(self, in_channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split = SplitBlock(split_ratio)
        c = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = ShuffleBlock(groups=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = self.split(x)
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        pre = self.bn3(self.conv3(out))
        out = self.shuffle(torch.cat([x1, F.relu(pre)], 1))
        return out, torch.cat([x1, pre], 1)


class DownBlock(nn.Module):
    """Stride-2 unit: two branches (dw 3x3 - 1x1, and 1x1 - dw 3x3 - 1x1), concat, shuffle.

    Returns ``(out, preact)``; ``preact`` is the unshuffled concatenation of the branches before their last ReLU.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        # left branch
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ShuffleBlock(groups=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre1 = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        out2 = F.relu(self.bn3(self.conv3(x)))
        pre2 = self.bn5(self.conv5(self.bn4(self.conv4(out2))))
        preact = torch.cat([pre1, pre2], 1)
        return self.shuffle(F.relu(preact)), preact


class ShuffleNetV2(ZooModel):
    """ShuffleNet V2 for 32x32 inputs; ``net_size`` selects a row of :data:`configs`.

    The head pools with a fixed 4x4 window (the 4x4 map of a 32 px input), as mdistiller does; ``global_pool`` pools
    the whole map instead, for other input sizes (the Tiny-ImageNet zoo: 8x8 maps at 64 px). Same parameters.
    """

    def __init__(self, net_size: float, num_classes: int = 100, global_pool: bool = False) -> None:
        super().__init__()
        self.global_pool = global_pool
        out_channels = configs[net_size]["out_channels"]
        num_blocks = configs[net_size]["num_blocks"]
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)
        self.stage_channels = list(out_channels[:3])

    def _make_layer(self, out_channels: int, num_blocks: int) -> Stage:
        layers: list[nn.Module] = [DownBlock(self.in_channels, out_channels)]
        layers += [BasicBlock(out_channels) for _ in range(num_blocks)]
        self.in_channels = out_channels
        return Stage(*layers)

    def get_feat_modules(self) -> nn.ModuleList:
        """Modules producing the intermediate features, in order."""
        return nn.ModuleList([self.conv1, self.bn1, self.layer1, self.layer2, self.layer3])

    def get_bn_before_relu(self) -> list[nn.Module]:
        """Not available: a stage's pre-activation is a concatenation, not a single BN output."""
        raise NotImplementedError('ShuffleNetV2 currently is not supported for "Overhaul" teacher')

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        f0 = F.relu(self.bn1(self.conv1(x)))
        outs, preacts = run_stages(f0, (self.layer1, self.layer2, self.layer3))
        out = F.relu(self.bn2(self.conv2(outs[-1])))
        pooled = (F.adaptive_avg_pool2d(out, 1) if self.global_pool else F.avg_pool2d(out, 4)).flatten(1)
        feats = {"feats": [f0, *outs], "preact_feats": [f0, *preacts], "pooled_feat": pooled, "prepool": out}
        return self.linear(pooled), feats


def ShuffleV2(num_classes: int = 100, **kwargs: Any) -> ShuffleNetV2:
    """ShuffleNet V2 1x (116/232/464 stage channels, 1024-d pooled feature)."""
    return ShuffleNetV2(net_size=1, num_classes=num_classes, **kwargs)
