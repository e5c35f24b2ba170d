"""The ImageNet zoo: `imagenet_model_dict[name] -> (builder, default teacher path or None)`.

Builders are called as `builder(num_classes=1000, image_size=224)` (only the ViTs use the size). Teacher weights are
read from local files only, `download_ckpts/imagenet_teachers/<name>.pth`; for the ResNets torchvision's published
file names in that folder are found too (`resnet34-b627a593.pth`, `resnet50-0676ba61.pth`, ...), and DeiT's
`regnety_160-a5fe301d.pth` for RegNetY-160. Nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch import nn

from .. import vit
from ..cifar import SDD_ALIAS_WHY
from .mobilenetv1 import MobileNetV1
from .resnet import ResNet18, ResNet34, ResNet50, ResNet101, ResNet152

__all__ = [
    "IMAGENET_ALIASES",
    "IMAGENET_TEACHER_DIR",
    "PUBLISHED_TEACHER_FILES",
    "MobileNetV1",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "ResNet101",
    "ResNet152",
    "find_imagenet_teacher",
    "imagenet_model_dict",
    "teacher_file_candidates",
]

IMAGENET_TEACHER_DIR = "download_ckpts/imagenet_teachers"

# Published file names accepted in IMAGENET_TEACHER_DIR, in order of preference. The tables' teachers are
# torchvision's IMAGENET1K_V1 weights (R34 73.31, R50 76.13), so V1 comes first; "old" = the pre-0.13 names of the
# same V1 weights.
PUBLISHED_TEACHER_FILES: dict[str, tuple[str, ...]] = {
    "ResNet18": ("resnet18-f37072fd.pth", "resnet18-5c106cde.pth"),
    "ResNet34": ("resnet34-b627a593.pth", "resnet34-333f7ec4.pth"),
    "ResNet50": ("resnet50-0676ba61.pth", "resnet50-19c8e357.pth", "resnet50-11ad3fa6.pth"),
    "ResNet101": ("resnet101-63fe2227.pth", "resnet101-5d3b4d8f.pth", "resnet101-cd907fc2.pth"),
    "ResNet152": ("resnet152-394f9c45.pth", "resnet152-b121ed2d.pth", "resnet152-f82ba261.pth"),
    "regnety_160": ("regnety_160-a5fe301d.pth",),
}

# Names published ImageNet configs use for a model of this zoo: old -> (name, why).
IMAGENET_ALIASES: dict[str, tuple[str, str]] = {
    "MobileNetV2": ("MobileNetV1", "the logit-standardisation repo's ImageNet configs call mdistiller's MobileNetV1 "
                                   "MobileNetV2"),
    # SDD's `<name>_sdd` models (its mdistiller/models/imagenet/__init__.py)
    **{f"{name}_sdd": (name, SDD_ALIAS_WHY) for name in ("ResNet18", "ResNet34", "ResNet50", "ResNet101")},
    "MobileNetV2_sdd": ("MobileNetV1", "SDD's ImageNet MobileNetV2_sdd is mdistiller's MobileNetV1 with a "
                                       "parameter-free spatial pyramid pooling"),
}


def _plain(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """A CNN builder with the zoo's signature (the input size does not change a CNN's weights)."""

    def build(num_classes: int = 1000, image_size: int = 224, **kwargs: Any) -> nn.Module:
        return builder(num_classes=num_classes, **kwargs)

    build.__name__ = builder.__name__
    build.__doc__ = builder.__doc__
    return build


def _teacher(name: str) -> str:
    return f"{IMAGENET_TEACHER_DIR}/{name}.pth"


imagenet_model_dict: dict[str, tuple[Callable[..., nn.Module], str | None]] = {
    "ResNet18": (_plain(ResNet18), _teacher("ResNet18")),
    "ResNet34": (_plain(ResNet34), _teacher("ResNet34")),
    "ResNet50": (_plain(ResNet50), _teacher("ResNet50")),
    "ResNet101": (_plain(ResNet101), _teacher("ResNet101")),
    "ResNet152": (_plain(ResNet152), _teacher("ResNet152")),
    "MobileNetV1": (_plain(MobileNetV1), None),
    "deit_tiny": (vit.deit_tiny, None),
    "deit_small": (vit.deit_small, None),
    "regnety_160": (vit.regnety_160, _teacher("regnety_160")),
}


def teacher_file_candidates(name: str) -> list[str]:
    """Where a teacher's weights may lie, in order: `<dir>/<name>.pth`, then the published file names."""
    path = imagenet_model_dict[name][1]
    if path is None:
        return []
    return [path] + [f"{IMAGENET_TEACHER_DIR}/{file}" for file in PUBLISHED_TEACHER_FILES.get(name, ())]


def find_imagenet_teacher(name: str, resolve: Callable[[str], str] = lambda p: p) -> str | None:
    """The first existing teacher file of `name` (each candidate passed through `resolve`), or None."""
    for candidate in teacher_file_candidates(name):
        path = resolve(candidate)
        if os.path.isfile(path):
            return path
    return None
