"""What every zoo model shares: the reference initialisations, the stage-channel accessor, and the stage of blocks
that return `(out, preact)` with the ResNet way of building and running them."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import MdistillerError


def classifier(model: nn.Module) -> nn.Linear:
    """The last nn.Linear of a model (its classifier), whatever its attribute name (fc, linear, classifier, head)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise MdistillerError(f"{type(model).__name__} has no nn.Linear classifier")
    return linears[-1]


def num_classes_of_model(model: nn.Module) -> int:
    """The class count of a model: its classifier's outputs (-1 when it has no nn.Linear)."""
    try:
        return classifier(model).out_features
    except MdistillerError:
        return -1


class ZooModel(nn.Module):
    """A zoo model: `forward -> (logits, feats)`; `stage_channels` lists the channels of `feats[1:]`.

    What the feature distillers read, besides `feats`: `get_stage_channels()` (channels of `feats[1:]`, the stem
    left out: unlike upstream's CIFAR models, whose lists start with the stem, nothing should slice it off again),
    `get_bn_before_relu()` where the model has one BN before each stage's last ReLU, and `ofd_first_stage`.
    """

    stage_channels: list[int]
    # OFD distils the stages from this index on. 0 everywhere but on the ImageNet ResNets and MobileNetV1, whose
    # upstream `get_stage_channels()` lists no stem, so that upstream's OFD (which slices one entry off as a stem)
    # leaves out their first stage: R50 -> MobileNetV1 has 3 connectors there (256->512, 512->1024, 1024->2048).
    ofd_first_stage: int = 0

    def get_stage_channels(self) -> list[int]:
        """Channels of ``feats[1:]`` (the stage outputs)."""
        return list(self.stage_channels)


class Stage(nn.Sequential):
    """Blocks in sequence (children `0`, `1`, ... as the published `layerN`), each returning ``(out, preact)``;
    returns the pair of its last block."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        preact = x
        for block in self:
            x, preact = block(x)
        return x, preact


def resnet_stage(block: Callable[[int, int, int], nn.Module], in_planes: int, planes: int, blocks: int,
                 stride: int, expansion: int) -> tuple[Stage, int]:
    """`blocks` blocks `block(in, planes, stride)`, the first with `stride`; the stage and its output channels."""
    layers: list[nn.Module] = []
    for s in [stride] + [1] * (blocks - 1):
        layers.append(block(in_planes, planes, s))
        in_planes = planes * expansion
    return Stage(*layers), in_planes


def run_stages(x: torch.Tensor, stages: Iterable[nn.Module]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each stage's output and pre-activation, running the stages in sequence from `x`."""
    outs, preacts = [], []
    for stage in stages:
        x, preact = stage(x)
        outs.append(x)
        preacts.append(preact)
    return outs, preacts


def kaiming_init(model: nn.Module) -> None:
    """torchvision's ResNet initialisation: kaiming-normal (fan_out) convolutions, norms at weight 1 and bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def fan_out_normal_init(model: nn.Module, linear_std: float | None = 0.01) -> None:
    """The VGG / MobileNetV2 / WRN initialisation: convolutions N(0, 2 / fan_out), BN at 1 and 0, linear biases 0 and
    linear weights N(0, linear_std) (left at PyTorch's default when linear_std is None, as WRN does)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
