"""What the feature methods read from a zoo model, each read giving a one-line error that names the model and the
method when the model cannot serve it (a ViT has no feature maps, MobileNetV2 no pre-activations, a ShuffleNet no
BN before its stage ReLUs)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MdistillerError
from .probe import probe_features


def _refuse(method: str, names: tuple[str, str], role: str, why: str) -> MdistillerError:
    name = names[0] if role == "student" else names[1]
    return MdistillerError(f"{method} cannot distil student {names[0]} from teacher {names[1]}: {role} {name} {why}; "
                           f"pick another {role}")


def feature_maps(feats: dict, key: str, method: str, role: str, names: tuple[str, str]) -> list[torch.Tensor]:
    """`feats[key]` ("feats" or "preact_feats", stem first), or a one-line error when the model has none."""
    maps = feats.get(key)
    if maps is None:
        raise _refuse(method, names, role, f"has no pre-activation features ({key} is None: its stages end "
                                           f"without a ReLU)")
    if not maps:
        raise _refuse(method, names, role, "has no feature maps (a transformer gives tokens)")
    return list(maps)


def probed_maps(student: nn.Module, teacher: nn.Module, input_size, method: str, names: tuple[str, str],
                key: str = "feats", upstream: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The student's and the teacher's `feats[key]` from one dry forward at `input_size` (`probe_features`, with
    upstream's BN side effect when `upstream`), each checked by `feature_maps`."""
    feats_s, feats_t = probe_features((student, teacher), input_size, upstream=upstream)
    return (feature_maps(feats_s, key, method, "student", names),
            feature_maps(feats_t, key, method, "teacher", names))


def stage_channels(model: nn.Module, method: str, role: str, names: tuple[str, str]) -> list[int]:
    """`model.get_stage_channels()` (the stage outputs, stem excluded), or a one-line error."""
    getter = getattr(model, "get_stage_channels", None)
    if getter is None:
        raise _refuse(method, names, role, "does not list its stage channels (no get_stage_channels)")
    return [int(c) for c in getter()]


def bn_before_relu(model: nn.Module, method: str, names: tuple[str, str]) -> list[nn.BatchNorm2d]:
    """The teacher's BN before each stage's last ReLU (`get_bn_before_relu()`), or a one-line error."""
    try:
        bns = model.get_bn_before_relu()
    except (AttributeError, NotImplementedError):
        bns = None
    if not bns:
        raise _refuse(method, names, "teacher", "has no single BN before its stage ReLUs (get_bn_before_relu), "
                                                "which the margins are computed from")
    return list(bns)


def ofd_first_stage(model: nn.Module) -> int:
    """The model's `ofd_first_stage` (see models.common.ZooModel); 0 for a model that does not declare it."""
    return int(getattr(model, "ofd_first_stage", 0))
