"""The Tiny-ImageNet zoo (64x64 inputs): `tiny_imagenet_model_dict[name] -> (builder, teacher path or None)`.

mdistiller's three models, under its names: ``ResNet18`` is the CIFAR zoo's ResNet18 (3x3 stride-1 stem, no max-pool,
global average pool: 64 -> 64 -> 32 -> 16 -> 8 px), ``MobileNetV2`` is mdistiller's own full-width
``mobilenetv2_tinyimagenet`` (not the CIFAR zoo's half-width one), ``ShuffleV2`` is the CIFAR zoo's ShuffleNet V2 1x
with a global average pool (mdistiller's fixed 4x4 pool cannot run a 64 px input: see the builder). Every builder is
called as ``builder(num_classes=200)``; state-dict names are mdistiller's, so its checkpoints load.

The teacher is read from ``download_ckpts/tiny_imagenet_teachers/ResNet18_vanilla/ti_res18`` (mdistiller's path, a
``{"model": state_dict}`` file); nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..cifar import ResNet18
from ..cifar.shufflenetv2 import ShuffleNetV2
from .mobilenetv2 import TinyMobileNetV2, mobilenetv2_tinyimagenet

__all__ = [
    "TINY_IMAGENET_TEACHER_DIR",
    "TinyMobileNetV2",
    "mobilenetv2_tinyimagenet",
    "shufflev2_tinyimagenet",
    "tiny_imagenet_model_dict",
]

TINY_IMAGENET_TEACHER_DIR = "download_ckpts/tiny_imagenet_teachers"


def shufflev2_tinyimagenet(num_classes: int = 200, **kwargs: Any) -> ShuffleNetV2:
    """ShuffleNet V2 1x pooling its whole last map. mdistiller's ShuffleV2 pools 4x4 windows, which on the 8x8 map
    of a 64 px image leaves 2x2 x 1024 = 4096 values for a 1024-input classifier (a shape error): global pooling
    is the pool it performs at 32 px, and keeps every parameter name and shape."""
    return ShuffleNetV2(net_size=1, num_classes=num_classes, global_pool=True, **kwargs)


tiny_imagenet_model_dict: dict[str, tuple[Callable[..., nn.Module], str | None]] = {
    "ResNet18": (ResNet18, f"{TINY_IMAGENET_TEACHER_DIR}/ResNet18_vanilla/ti_res18"),
    "MobileNetV2": (mobilenetv2_tinyimagenet, None),
    "ShuffleV2": (shufflev2_tinyimagenet, None),
}
