"""MobileNetV1 (Howard et al. 2017) with mdistiller's ImageNet parameter names.

`model.0` is the stem (conv 3x3 stride 2, BN, ReLU); `model.1` .. `model.13` are depthwise-separable blocks
(`k.0` depthwise conv, `k.1` BN, `k.3` pointwise conv, `k.4` BN, ReLUs at `k.2` and `k.5`); `model.14` pools; `fc`
classifies. mdistiller's files put a fixed AvgPool2d(7) at `model.14`; ours pools adaptively (no parameters, so the
same state dict) and so takes any input size. The logit-standardisation repo calls this model "MobileNetV2" in its
ImageNet configs.

`forward` returns `(logits, feats)`: `feats["feats"]` = [stem, stage1 (128 ch, /4), stage2 (256, /8),
stage3 (512, /16), stage4 (1024, /32)] after ReLU, `feats["preact_feats"]` the same before it, `pooled_feat` B x 1024,
`prepool` the map it pools (the last block's output).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..common import ZooModel

__all__ = ["MobileNetV1"]

# (in, out, stride) of the 13 depthwise-separable blocks
_BLOCKS = (
    (32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
    (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 1024, 2), (1024, 1024, 1),
)
_STAGE_ENDS = (3, 5, 11, 13)  # indices in `model` whose outputs are the four stage features


def _conv_bn(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


def _conv_dw(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in), nn.ReLU(inplace=True),
        nn.Conv2d(c_in, c_out, 1, 1, 0, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class MobileNetV1(ZooModel):
    """MobileNetV1, width 1.0, for ImageNet-sized inputs."""

    ofd_first_stage = 1  # as upstream's OFD, which slices the first entry off its stem-less stage list

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.model = nn.Sequential(
            _conv_bn(3, 32, 2),
            *(_conv_dw(c_in, c_out, s) for c_in, c_out, s in _BLOCKS),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(1024, num_classes)
        self.stage_channels = [128, 256, 512, 1024]

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The BN before the last ReLU of each stage's final block."""
        return [self.model[i][-2] for i in _STAGE_ENDS]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        feats, preacts = [], []
        for index in range(len(self.model) - 1):
            block = self.model[index]
            for layer in list(block)[:-1]:  # all but the block's last ReLU, so the pre-activation is kept
                x = layer(x)
            preact, x = x, F.relu(x)
            if index == 0 or index in _STAGE_ENDS:
                feats.append(x)
                preacts.append(preact)
        pooled = torch.flatten(self.model[-1](x), 1)
        logits = self.fc(pooled)
        return logits, {"feats": feats, "preact_feats": preacts, "pooled_feat": pooled, "prepool": x}
