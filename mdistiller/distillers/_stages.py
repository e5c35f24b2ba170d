"""What the classic feature methods (AT, NST, SP, KDSVD) read from a model's `feats`, paired as upstream pairs them.

Upstream mdistiller's AT, NST and KDSVD zip `feats_s[1:]` with `feats_t[1:]` from the front, truncating to the
shorter list. Its ImageNet MobileNetV1 lists no stem (4 maps, /4../32) while ours lists it first (5 maps, like every
other model of our zoos), so upstream's `feats[1:]` of a MobileNetV1 is our `feats[2:]`: `stage_maps` drops that
extra map, which reproduces upstream's shifted pairing for ResNet50 -> MobileNetV1 (MV1 /8 with R50 /4, MV1 /16 with
R50 /8, MV1 /32 with R50 /16; R50's last stage unused) while ResNet34 -> ResNet18 pairs stage for stage.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MdistillerError
from ..models.imagenet.mobilenetv1 import MobileNetV1
from .probe import CIFAR_INPUT_SIZE, Setting, map_shapes, probe_features, probe_input_size


def maps_skipped(model: nn.Module) -> int:
    """How many leading entries of our `feats["feats"]` upstream's `feats[1:]` leaves out: 2 for the ImageNet
    MobileNetV1 (our stem plus the /4 map, which upstream lists first because it has no stem entry), else 1."""
    return 2 if isinstance(model, MobileNetV1) else 1


def stage_maps(feats: dict, skipped: int) -> list[torch.Tensor]:
    """The maps upstream's classic distillers read as `feats[1:]` (see `maps_skipped`)."""
    return list(feats["feats"][skipped:])


def summed(terms: Sequence[torch.Tensor], loss_name: str, needs: str = "at least one (student, teacher) map pair"
           ) -> torch.Tensor:
    """`terms[0] + terms[1] + ...` in that order (upstream's summation order, so results match bit for bit); one
    clear error when the pairing left nothing to sum."""
    if not terms:
        raise ValueError(f"{loss_name} needs {needs}")
    return sum(terms[1:], terms[0])


def pool_to_smaller(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The map of larger height average-pooled to the other's (h, h), as upstream's AT and NST do (square target)."""
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    return f_s, f_t


def model_map_shapes(model: nn.Module, input_size: Sequence[int]) -> list[tuple[int, ...]]:
    """Shapes of `feats["feats"]` from the clean probe (eval mode, zero image): building a distiller leaves the
    models and the RNG as they were."""
    return map_shapes(probe_features([model], input_size)[0])


def paired_map_shapes(student: nn.Module, teacher: nn.Module, setting: Setting, method: str, minimum: int = 1
                      ) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(student shape, teacher shape) of each stage pair the method will compare, read by a side-effect-free dry
    forward; a model without enough feature maps (a ViT has none) is refused in one line naming model and method."""
    size = probe_input_size(setting, CIFAR_INPUT_SIZE, "the feature-map probe")
    shapes = []
    for role, model, name in (("student", student, setting.student), ("teacher", teacher, setting.teacher)):
        all_maps = model_map_shapes(model, size)
        maps = all_maps[maps_skipped(model):]
        if len(maps) < minimum or any(len(s) != 4 for s in maps):
            raise MdistillerError(
                f"{method} needs at least {minimum} stage feature map(s) after the stem from the {role}, and {role} "
                f"{name} has {len(maps)} ({len(all_maps)} maps in feats); use a logit method (KD, DKD) or PKT / RKD, "
                f"which read pooled features"
            )
        shapes.append(maps)
    return list(zip(shapes[0], shapes[1]))


def last_map_shapes(student: nn.Module, teacher: nn.Module, setting: Setting, method: str) -> tuple[tuple, tuple]:
    """Shapes of `feats[-1]` of student and teacher; a model without feature maps is refused in one line."""
    size = probe_input_size(setting, CIFAR_INPUT_SIZE, "the feature-map probe")
    shapes = []
    for role, model, name in (("student", student, setting.student), ("teacher", teacher, setting.teacher)):
        maps = model_map_shapes(model, size)
        if not maps:
            raise MdistillerError(
                f"{method} needs the last feature map of the {role}, and {role} {name} has no feature maps; use a "
                f"logit method (KD, DKD) or PKT / RKD, which read pooled features"
            )
        shapes.append(maps[-1])
    return shapes[0], shapes[1]
