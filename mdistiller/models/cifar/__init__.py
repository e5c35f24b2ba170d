"""The CIFAR-100 model zoo shared by mdistiller / RepDistiller.

``cifar_model_dict`` maps each zoo name to ``(builder, teacher_checkpoint)``; the checkpoint path is relative to the
working directory (``download_ckpts/cifar_teachers/<name>_vanilla/ckpt_epoch_240.pth``) and ``None`` for models
that are only used as students. Every builder is called as ``builder(num_classes=100)`` and returns a model whose
``forward`` gives ``(logits, {"feats": [...], "preact_feats": [...] | None, "pooled_feat": tensor, "prepool": map})``,
``prepool`` being the very tensor the model's average pooling reads (see ``models.common.ZooModel``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .mobilenetv2 import mobile_half
from .resnet import resnet8, resnet8x4, resnet14, resnet20, resnet32, resnet32x4, resnet44, resnet56, resnet110
from .resnetv2 import ResNet18, ResNet34, ResNet50, ResNet101, ResNet152
from .shufflenetv1 import ShuffleV1
from .shufflenetv2 import ShuffleV2
from .vgg import vgg8, vgg11, vgg13, vgg16, vgg19
from .wrn import wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2

__all__ = [
    "CIFAR100_TEACHER_DIR",
    "CIFAR_ALIASES",
    "SDD_ALIAS_WHY",
    "cifar_model_dict",
    "mobile_half",
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet8x4",
    "resnet32x4",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "ResNet101",
    "ResNet152",
    "ShuffleV1",
    "ShuffleV2",
    "vgg8",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
    "wrn_16_1",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
]

CIFAR100_TEACHER_DIR = "download_ckpts/cifar_teachers"


def _teacher(name: str) -> str:
    return f"{CIFAR100_TEACHER_DIR}/{name}_vanilla/ckpt_epoch_240.pth"


cifar_model_dict: dict[str, tuple[Callable[..., nn.Module], str | None]] = {
    # teachers (published checkpoints in cifar_teachers.tar)
    "resnet56": (resnet56, _teacher("resnet56")),
    "resnet110": (resnet110, _teacher("resnet110")),
    "resnet32x4": (resnet32x4, _teacher("resnet32x4")),
    "ResNet50": (ResNet50, _teacher("ResNet50")),
    "wrn_40_2": (wrn_40_2, _teacher("wrn_40_2")),
    "vgg13": (vgg13, _teacher("vgg13")),
    # students
    "resnet8": (resnet8, None),
    "resnet14": (resnet14, None),
    "resnet20": (resnet20, None),
    "resnet32": (resnet32, None),
    "resnet44": (resnet44, None),
    "resnet8x4": (resnet8x4, None),
    "ResNet18": (ResNet18, None),
    "wrn_16_1": (wrn_16_1, None),
    "wrn_16_2": (wrn_16_2, None),
    "wrn_40_1": (wrn_40_1, None),
    "vgg8": (vgg8, None),
    "vgg11": (vgg11, None),
    "vgg16": (vgg16, None),
    "vgg19": (vgg19, None),
    "MobileNetV2": (mobile_half, None),
    "ShuffleV1": (ShuffleV1, None),
    "ShuffleV2": (ShuffleV2, None),
}

SDD_ALIAS_WHY = ("SDD's configs name the zoo model with a parameter-free spatial pyramid pooling (same weights, same "
                 "teacher checkpoint)")

# Names published CIFAR configs use for a model of this zoo: old -> (name, why). SDD's `<name>_sdd` models (the
# names of its mdistiller/models/cifar/__init__.py).
CIFAR_ALIASES: dict[str, tuple[str, str]] = {
    f"{name}_sdd": (name, SDD_ALIAS_WHY)
    for name in ("resnet56", "resnet110", "resnet32x4", "ResNet50", "wrn_40_2", "vgg13", "wrn_16_1", "wrn_16_2",
                 "wrn_40_1", "vgg8", "vgg11", "vgg16", "vgg19", "MobileNetV2", "ShuffleV1", "ShuffleV2", "resnet8",
                 "resnet14", "resnet20", "resnet32", "resnet44", "resnet8x4", "ResNet18")
}
