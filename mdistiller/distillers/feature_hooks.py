"""What the feature methods read from a zoo model, each read giving a one-line error that names the model and the
method when the model cannot serve it (a ViT has no feature maps, MobileNetV2 no pre-activations, a ShuffleNet no
BN before its stage ReLUs)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MdistillerError


def model_names(cfg) -> tuple[str, str]:
    """(student, teacher) names as the config gives them, for messages."""
    return str(cfg.DISTILLER.STUDENT), str(cfg.DISTILLER.TEACHER)


def feature_maps(feats: dict, key: str, method: str, role: str, name: str) -> list[torch.Tensor]:
    """`feats[key]` ("feats" or "preact_feats", stem first), or a one-line error when the model has none."""
    maps = feats.get(key)
    if maps is None:
        raise MdistillerError(
            f"{method} needs the {role}'s pre-activation features ({key}) and {role} {name} has none "
            f"(its stages end without a ReLU); pick another {role}"
        )
    if not maps:
        raise MdistillerError(
            f"{method} needs the {role}'s feature maps and {role} {name} has none (a transformer gives tokens): "
            f"pick a CNN {role}"
        )
    return list(maps)


def stage_channels(model: nn.Module, method: str, role: str, name: str) -> list[int]:
    """`model.get_stage_channels()` (the stage outputs, stem excluded), or a one-line error."""
    getter = getattr(model, "get_stage_channels", None)
    if getter is None:
        raise MdistillerError(f"{method} needs the {role}'s stage channels and {role} {name} does not list them "
                              f"(no get_stage_channels); pick another {role}")
    return [int(c) for c in getter()]


def bn_before_relu(model: nn.Module, method: str, name: str) -> list[nn.BatchNorm2d]:
    """The teacher's BN before each stage's last ReLU (`get_bn_before_relu()`), or a one-line error."""
    try:
        bns = model.get_bn_before_relu()
    except (AttributeError, NotImplementedError):
        bns = None
    if not bns:
        raise MdistillerError(
            f"{method} cannot distil from teacher {name}: it has no single BN before its stage ReLUs "
            f"(get_bn_before_relu), which the margins are computed from; pick another teacher"
        )
    return list(bns)


def ofd_first_stage(model: nn.Module) -> int:
    """The model's `ofd_first_stage` (see models.common.ZooModel); 0 for a model that does not declare it."""
    return int(getattr(model, "ofd_first_stage", 0))
