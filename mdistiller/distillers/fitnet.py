"""FitNet (Romero et al., ICLR 2015), DISTILLER.TYPE `FITNET`: regress the student's hint map onto the teacher's.

    loss_ce = CE_WEIGHT * CE(z_s, y)
    loss_kd = FEAT_WEIGHT * mse(conv_reg(feats_s[HINT_LAYER]), feats_t[HINT_LAYER])

`feats[i]` are the post-ReLU maps, stem = 0 (HINT_LAYER 2: the second stage's output). `conv_reg` is upstream's
ConvReg (state-dict names `conv_reg.conv.*`, `conv_reg.bn.*`): relu(bn(conv(x))) with the conv chosen by the map
heights: H_s = 2 H_t -> 3x3 stride-2 conv; 2 H_s = H_t -> 4x4 stride-2 transposed conv; H_s >= H_t -> a valid conv
of kernel (1 + H_s - H_t, 1 + W_s - W_t); convs keep PyTorch's default init and bias. Any other pair of shapes is
refused in one line naming both models (upstream raised a TypeError).

The shapes come from the shared probe (mdistiller.distillers.probe) at FITNET.INPUT_SIZE (the data set's size on
ImageNet). FITNET.UPSTREAM_PROBE False (default): a zero image in eval mode, nothing changes. True: upstream's probe,
one noise image from the global RNG through both models in train mode, which moves every BN running mean/var of the
student and of the frozen teacher 10% toward that image's statistics. The default is the clean probe because the
published FitNet numbers (CRD paper, RepDistiller's code) were made with an eval-mode probe that changes nothing,
and because upstream's moves the teacher away from the checkpoint it was given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MdistillerError
from ._base import Declaration, Distiller, cross_entropy
from .config import Key, config_section
from .feature_hooks import probed_maps
from .precision import fp32_loss
from .probe import DEFAULT_SETTING, Setting, probe_input_size
from .registry import register_distiller


def hint_conv(s_shape, t_shape) -> nn.Module | None:
    """Upstream's ConvReg conv from a (N, C, H, W) student map to the teacher's, or None when no rule applies."""
    _, s_c, s_h, s_w = s_shape
    _, t_c, t_h, t_w = t_shape
    if s_h == 2 * t_h:
        return nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
    if s_h * 2 == t_h:
        return nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
    if s_h >= t_h:
        return nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
    return None


class ConvReg(nn.Module):
    """Convolutional regressor (upstream's names): `relu(bn(conv(x)))`, or `bn(conv(x))` without `use_relu`."""

    def __init__(self, s_shape, t_shape, use_relu: bool = True):
        super().__init__()
        conv = hint_conv(s_shape, t_shape)
        if conv is None:
            raise MdistillerError(
                f"ConvReg cannot map a {tuple(s_shape[1:])} map onto a {tuple(t_shape[1:])} one: it handles "
                f"H_s = 2 H_t, 2 H_s = H_t and H_s >= H_t"
            )
        self.use_relu = use_relu
        self.conv = conv
        self.bn = nn.BatchNorm2d(t_shape[1])
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return self.relu(x) if self.use_relu else x


@fp32_loss
def fitnet_loss(regressed: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the regressed student map and the teacher's (fp32)."""
    return F.mse_loss(regressed.float(), teacher_map.float())


config_section("FITNET", {
    "HINT_LAYER": Key(2, "feats index of the hint (stem = 0)"),
    "INPUT_SIZE": Key((32, 32), "input of the dry forward that reads the hint shapes"),
    "UPSTREAM_PROBE": Key(False, "ours: True = upstream's shape probe (noise image in train mode: BN running stats "
                                 "move); False = a zero image in eval mode, no side effect"),
    "LOSS": {
        "CE_WEIGHT": Key(1.0, "weight of the cross-entropy with the labels"),
        "FEAT_WEIGHT": Key(100.0, "weight of the hint regression"),
    },
})


@register_distiller("FITNET")
class FitNet(Distiller):
    """Hint regression on feats[HINT_LAYER]; see the module docstring."""

    declares = Declaration(
        loss_terms=("loss_ce", "loss_kd"),
        distillation_terms=("loss_kd",),
        config_sections=("FITNET",),
        extra_modules=("conv_reg",),
    )

    @classmethod
    def from_config(cls, cfg) -> dict:
        fitnet = cfg.FITNET
        return {"ce_weight": fitnet.LOSS.CE_WEIGHT, "feat_weight": fitnet.LOSS.FEAT_WEIGHT,
                "hint_layer": fitnet.HINT_LAYER, "input_size": tuple(fitnet.INPUT_SIZE),
                "upstream_probe": bool(fitnet.UPSTREAM_PROBE), "setting": Setting.from_cfg(cfg)}

    def setup(self, ce_weight: float = 1.0, feat_weight: float = 100.0, hint_layer: int = 2, input_size=(32, 32),
              upstream_probe: bool = False, setting: Setting = DEFAULT_SETTING) -> None:
        self.ce_weight = ce_weight
        self.feat_weight = feat_weight
        self.hint_layer = hint_layer
        names = s_name, t_name = setting.names
        size = probe_input_size(setting, input_size, "FITNET.INPUT_SIZE")
        maps_s, maps_t = probed_maps(self.student, self.teacher, size, "FITNET", names, upstream=upstream_probe)
        for role, name, maps in (("student", s_name, maps_s), ("teacher", t_name, maps_t)):
            if not -len(maps) <= self.hint_layer < len(maps):
                raise MdistillerError(f"FITNET.HINT_LAYER {self.hint_layer} is out of range: {role} {name} has "
                                      f"{len(maps)} feature maps (stem = 0)")
        s_shape, t_shape = tuple(maps_s[self.hint_layer].shape), tuple(maps_t[self.hint_layer].shape)
        if hint_conv(s_shape, t_shape) is None:
            raise MdistillerError(
                f"FITNET cannot regress student {s_name}'s hint map {s_shape[1:]} onto teacher {t_name}'s "
                f"{t_shape[1:]} (FITNET.HINT_LAYER {self.hint_layer}): ConvReg handles H_s = 2 H_t, 2 H_s = H_t and "
                f"H_s >= H_t; pick another HINT_LAYER or pair"
            )
        self.conv_reg = ConvReg(s_shape, t_shape)

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **batch) -> tuple[torch.Tensor, dict]:
        logits_student, feats_student = self.student(image)
        _, feats_teacher = self.teacher_forward(image)
        regressed = self.conv_reg(feats_student["feats"][self.hint_layer])
        losses = {
            "loss_ce": self.ce_weight * cross_entropy(logits_student, target),
            "loss_kd": self.feat_weight * fitnet_loss(regressed, feats_teacher["feats"][self.hint_layer]),
        }
        return logits_student, losses
