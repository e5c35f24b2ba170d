"""OFD (Heo et al., ICCV 2019, "A comprehensive overhaul of feature distillation"), DISTILLER.TYPE `OFD`.

    loss_ce = CE_WEIGHT * CE(z_s, y)
    loss_kd = FEAT_WEIGHT * sum_i partial_l2(connector_i(p_s,i), pool(p_t,i), margin_i) / 2^(n - 1 - i)

on the pre-ReLU stage outputs `preact_feats[1:]` of both models, the two lists aligned on their last n = min(len)
entries (the deepest stage has weight 1, then 1/2, 1/4). `connector_i` = Conv2d(C_s, C_t, KERNEL_SIZE, bias False,
init N(0, 2 / (k k C_t))) + BatchNorm2d(C_t) (upstream's names `connectors.connectors.{i}.{0,1}.*`); the teacher's
map is average-pooled to the student's size. Partial L2, elementwise with student s, teacher t and margin m:
(s - m)^2 [s > m, t <= m] + (s - t)^2 [s > t, m < t <= 0] + (s - t)^2 [t > 0], batch mean then summed over C, H, W.
The margin of a channel is the mean of the teacher's pre-ReLU response below zero, from the BN before that ReLU
(gamma, beta): m = beta - |gamma| phi(beta / |gamma|) / Phi(-beta / |gamma|) when Phi(-beta / |gamma|) > 0.001,
else -3 |gamma| (Phi, phi: standard normal CDF and density); computed once at construction, float32, not saved.

What is upstream's, on purpose:
- The teacher runs in train mode while the student trains (upstream's OFD and the authors' code): its BN layers use
  batch statistics and their running statistics drift every step (under no_grad; its weights never change). The
  distiller declares it through `teacher_train_mode`; OFD.TEACHER_EVAL True keeps the teacher in eval mode instead.
- The stem is never distilled (our `get_stage_channels()` already leaves it out), and on the ImageNet ResNets and
  MobileNetV1 neither is the first stage (`ofd_first_stage` of the zoo): upstream's ResNet50 -> MobileNetV1 has 3
  connectors, 256->512, 512->1024, 1024->2048, on MobileNetV1's /8, /16, /32 maps against ResNet50's layers 2-4.

Ours: margins follow the stage alignment from the back, as the features do. Upstream indexes them from the front,
which is the same whenever the teacher's BN list has the aligned length (every pair upstream can run) and crashes
otherwise. Models that cannot serve (a ShuffleNet teacher: no BN before its stage ReLUs; a MobileNetV2 student: no
pre-activations; ViTs) are refused in one line.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MdistillerError
from ._base import Declaration, Distiller, cross_entropy
from .config import Key, config_section
from .feature_hooks import bn_before_relu, ofd_first_stage, probed_maps, stage_channels
from .precision import fp32_loss
from .probe import CIFAR_INPUT_SIZE, DEFAULT_SETTING, Setting, probe_input_size
from .registry import register_distiller


def ofd_margins(gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Per-channel margins (1, C, 1, 1) float32 from a BN's weight and bias, computed in double: the mean of
    N(beta, gamma^2) below zero where its mass there exceeds 0.001, else -3 |gamma|. A zero gamma (upstream: a
    ZeroDivisionError) gives the limit: beta when beta < 0, 0 otherwise."""
    s = gamma.detach().double().abs().cpu()
    m = beta.detach().double().cpu()
    ratio = m / s
    below = 0.5 * torch.special.erfc(ratio / math.sqrt(2.0))  # Phi(-m / s)
    density = torch.exp(-(ratio**2) / 2) / math.sqrt(2 * math.pi)
    margin = torch.where(below > 0.001, m - s * density / below, -3 * s)  # NaN compares False: -3 * 0 = 0
    return margin.float().view(1, -1, 1, 1)


@fp32_loss
def ofd_partial_l2(source: torch.Tensor, target: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """OFD's partial L2 between a student map and the teacher's at the same size, batch mean summed over C, H, W."""
    source, target, margin = source.float(), target.float(), margin.float()
    loss = (
        (source - margin) ** 2 * ((source > margin) & (target <= margin)).float()
        + (source - target) ** 2 * ((source > target) & (target > margin) & (target <= 0)).float()
        + (source - target) ** 2 * (target > 0).float()
    )
    return loss.abs().mean(dim=0).sum()


@fp32_loss
def ofd_loss(sources: list[torch.Tensor], targets: list[torch.Tensor], margins: list[torch.Tensor]) -> torch.Tensor:
    """sum_i partial_l2(s_i, avgpool(t_i to s_i's size), m_i) / 2^(n - 1 - i): the deepest stage weighs 1."""
    n = len(sources)
    total = torch.zeros((), device=sources[0].device)
    for i, (source, target, margin) in enumerate(zip(sources, targets, margins)):
        pooled = F.adaptive_avg_pool2d(target, source.shape[-2:])
        total = total + ofd_partial_l2(source, pooled, margin) / 2 ** (n - 1 - i)
    return total


def connector(s_channels: int, t_channels: int, kernel_size: int) -> nn.Sequential:
    """Conv (no bias, N(0, 2 / (k k C_t))) + BN (1, 0), from the student's channels to the teacher's."""
    conv = nn.Conv2d(s_channels, t_channels, kernel_size, stride=1, padding=(kernel_size - 1) // 2, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (kernel_size * kernel_size * t_channels)))
    bn = nn.BatchNorm2d(t_channels)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return nn.Sequential(conv, bn)


class ConnectorConvBN(nn.Module):
    """One connector per aligned stage; the list is itself named `connectors`, as upstream's."""

    def __init__(self, s_channels: list[int], t_channels: list[int], kernel_size: int = 1):
        super().__init__()
        self.connectors = nn.ModuleList(connector(s, t, kernel_size) for s, t in zip(s_channels, t_channels))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [conn(f) for conn, f in zip(self.connectors, feats)]


config_section("OFD", {
    "LOSS": {
        "CE_WEIGHT": Key(1.0, "weight of the cross-entropy with the labels"),
        "FEAT_WEIGHT": Key(0.001, "weight of the partial L2 term"),
    },
    "CONNECTOR": {"KERNEL_SIZE": Key(1, "kernel of the student's connector convolutions (odd)")},
    "TEACHER_EVAL": Key(False, "ours: True keeps the teacher in eval mode (upstream: train mode, BN drift)"),
})


def ofd_teacher_train_mode(hparams) -> bool:
    """Upstream's OFD runs its teacher in train mode; OFD.TEACHER_EVAL keeps it in eval mode."""
    return not hparams.get("teacher_eval", False)


@register_distiller("OFD")
class OFD(Distiller):
    """Overhaul of feature distillation; see the module docstring."""

    declares = Declaration(
        loss_terms=("loss_ce", "loss_kd"),
        distillation_terms=("loss_kd",),
        config_sections=("OFD",),
        teacher_train_mode=ofd_teacher_train_mode,
        extra_modules=("connectors",),
    )

    @classmethod
    def from_config(cls, cfg) -> dict:
        ofd = cfg.OFD
        kernel = int(ofd.CONNECTOR.KERNEL_SIZE)
        if kernel < 1 or kernel % 2 == 0:
            raise MdistillerError(f"OFD.CONNECTOR.KERNEL_SIZE must be an odd positive size (the map keeps its size), "
                                  f"got {kernel}")
        return {"ce_weight": ofd.LOSS.CE_WEIGHT, "feat_weight": ofd.LOSS.FEAT_WEIGHT, "kernel_size": kernel,
                "teacher_eval": bool(ofd.TEACHER_EVAL), "setting": Setting.from_cfg(cfg)}

    def setup(self, ce_weight: float = 1.0, feat_weight: float = 0.001, kernel_size: int = 1,
              teacher_eval: bool = False, setting: Setting = DEFAULT_SETTING) -> None:
        student, teacher = self.student, self.teacher
        self.ce_weight = ce_weight
        self.feat_weight = feat_weight
        self.teacher_eval = teacher_eval  # the base set teacher_train_mode from it (ofd_teacher_train_mode)
        kernel = kernel_size
        names = s_name, t_name = setting.names
        # a clean dry forward: which models can serve (pre-activations present, as many as the stages listed)
        maps_s, maps_t = probed_maps(student, teacher, probe_input_size(setting, CIFAR_INPUT_SIZE), "OFD", names,
                                     key="preact_feats")
        self.s_first, self.t_first = ofd_first_stage(student), ofd_first_stage(teacher)
        stages = []
        for role, name, model, all_maps, first in (("student", s_name, student, maps_s, self.s_first),
                                                   ("teacher", t_name, teacher, maps_t, self.t_first)):
            maps = all_maps[1:]
            channels = stage_channels(model, "OFD", role, names)
            if [f.shape[1] for f in maps] != channels:
                raise MdistillerError(f"OFD: {role} {name} lists stage channels {channels} but its preact_feats[1:] "
                                      f"have {[f.shape[1] for f in maps]}")
            stages.append(channels[first:])
        bns = bn_before_relu(teacher, "OFD", names)[self.t_first:]
        self.num_stages = n = min(len(stages[0]), len(stages[1]))
        s_channels, t_channels = stages[0][-n:], stages[1][-n:]
        if n == 0 or len(bns) < n or [bn.num_features for bn in bns[-n:]] != t_channels:
            raise MdistillerError(f"OFD: teacher {t_name}'s BNs before its stage ReLUs "
                                  f"({[bn.num_features for bn in bns]}) do not match its stages {t_channels}")
        self.connectors = ConnectorConvBN(s_channels, t_channels, kernel)
        for i, bn in enumerate(bns[-n:]):  # recomputed from the teacher at every build: kept out of checkpoints
            self.register_buffer(f"margin_{i}", ofd_margins(bn.weight, bn.bias), persistent=False)

    def margins(self) -> list[torch.Tensor]:
        """The per-stage margins (1, C_t, 1, 1), shallowest aligned stage first."""
        return [getattr(self, f"margin_{i}") for i in range(self.num_stages)]

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **batch) -> tuple[torch.Tensor, dict]:
        logits_student, feats_student = self.student(image)
        _, feats_teacher = self.teacher_forward(image)
        n = self.num_stages
        sources = self.connectors(feats_student["preact_feats"][1 + self.s_first:][-n:])
        targets = feats_teacher["preact_feats"][1 + self.t_first:][-n:]
        losses = {
            "loss_ce": self.ce_weight * cross_entropy(logits_student, target),
            "loss_kd": self.feat_weight * ofd_loss(sources, targets, self.margins()),
        }
        return logits_student, losses
