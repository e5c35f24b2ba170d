"""VID (Ahn et al., CVPR 2019), DISTILLER.TYPE `VID`: variational information distillation on every stage.

    loss_ce = CE_WEIGHT * CE(z_s, y)
    loss_kd = FEAT_WEIGHT * sum_i mean 0.5 * ((mu_i - f_t,i)^2 / var_i + log var_i)

over the stage outputs feats[1:] (post-ReLU, stem left out), paired from the front, one term per student stage (the
teacher needs at least as many). In each pair the larger map is average-pooled to the smaller one's (square) size;
`mu_i = regressors[i](f_s,i)` with `regressors[i]` = conv1x1(C_s, C_t) - ReLU - conv1x1(C_t, C_t) - ReLU -
conv1x1(C_t, C_t), no biases, default init (upstream's state-dict names `regressors.{i}.{0,2,4}.weight`);
`var_i = log(1 + exp(log_scale_i)) + EPS` per channel, `log_scale_i` starting at `log(exp(INIT_PRED_VAR - EPS) - 1)`.

Variances (VID.LEARN_VARIANCE):
- False (default, upstream): upstream keeps the log-scales in a plain Python list, so they are never trained nor
  saved: `var` stays 5.00000048 (float32) for the whole run and VID is MSE / 10 plus the constant 0.5 ln 5 = 0.8047
  per stage. Here they are non-persistent buffers: out of the state dict and of get_learnable_parameters().
- True (the paper): the log-scales are parameters `log_scales.{i}`, trained by the student's optimizer (with its
  weight decay) and saved in checkpoints (which then hold keys upstream's do not).

Shapes come from the shared probe (mdistiller.distillers.probe) at VID.INPUT_SIZE; VID.UPSTREAM_PROBE as FITNET's
(False: clean eval-mode probe, the default, as the code behind the published numbers; True: upstream's train-mode
noise probe that moves both models' BN running statistics 10%).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import MdistillerError
from ._base import Declaration, Distiller, cross_entropy
from ._stages import pool_to_smaller
from .config import Key, config_section
from .feature_hooks import probed_maps
from .precision import fp32_loss
from .probe import DEFAULT_SETTING, Setting, probe_input_size
from .registry import register_distiller


def vid_regressor(s_channels: int, t_channels: int) -> nn.Sequential:
    """conv1x1 - ReLU - conv1x1 - ReLU - conv1x1, no biases (children 0, 2, 4 hold the weights)."""
    return nn.Sequential(
        nn.Conv2d(s_channels, t_channels, kernel_size=1, bias=False), nn.ReLU(),
        nn.Conv2d(t_channels, t_channels, kernel_size=1, bias=False), nn.ReLU(),
        nn.Conv2d(t_channels, t_channels, kernel_size=1, bias=False),
    )


def initial_log_scale(init_pred_var: float, eps: float, channels: int) -> torch.Tensor:
    """`log(exp(INIT_PRED_VAR - EPS) - 1)` in double, times float32 ones: upstream's initial log-scale."""
    return math.log(math.exp(init_pred_var - eps) - 1.0) * torch.ones(channels)


@fp32_loss
def vid_loss(pred_mean: torch.Tensor, target: torch.Tensor, log_scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Mean over (B, C, H, W) of the Gaussian negative log-likelihood 0.5 ((mu - t)^2 / var + log var) without its
    constant, `var = log(1 + exp(log_scale)) + eps` per channel (upstream's softplus form, fp32)."""
    var = (torch.log(1.0 + torch.exp(log_scale.float())) + eps).view(1, -1, 1, 1)
    return (0.5 * ((pred_mean.float() - target.float()) ** 2 / var + torch.log(var))).mean()


config_section("VID", {
    "LOSS": {
        "CE_WEIGHT": Key(1.0, "weight of the cross-entropy with the labels"),
        "FEAT_WEIGHT": Key(1.0, "weight of the variational term"),
    },
    "EPS": Key(1e-5, "variance floor"),
    "INIT_PRED_VAR": Key(5.0, "initial predicted variance"),
    "INPUT_SIZE": Key((32, 32), "input of the dry forward that reads the stage shapes"),
    "UPSTREAM_PROBE": Key(False, "ours: as FITNET.UPSTREAM_PROBE"),
    "LEARN_VARIANCE": Key(False, "ours: True trains (and saves) the log-scales as the paper; upstream: constant 5.0"),
})


@register_distiller("VID")
class VID(Distiller):
    """Variational information distillation over the stage outputs; see the module docstring."""

    declares = Declaration(
        loss_terms=("loss_ce", "loss_kd"),
        distillation_terms=("loss_kd",),
        config_sections=("VID",),
        extra_modules=("regressors", "log_scales"),
    )

    @classmethod
    def from_config(cls, cfg) -> dict:
        vid = cfg.VID
        return {"ce_weight": vid.LOSS.CE_WEIGHT, "feat_weight": vid.LOSS.FEAT_WEIGHT, "eps": vid.EPS,
                "init_pred_var": vid.INIT_PRED_VAR, "input_size": tuple(vid.INPUT_SIZE),
                "upstream_probe": bool(vid.UPSTREAM_PROBE), "learn_variance": bool(vid.LEARN_VARIANCE),
                "setting": Setting.from_cfg(cfg)}

    def setup(self, ce_weight: float = 1.0, feat_weight: float = 1.0, eps: float = 1e-5, init_pred_var: float = 5.0,
              input_size=(32, 32), upstream_probe: bool = False, learn_variance: bool = False,
              setting: Setting = DEFAULT_SETTING) -> None:
        self.ce_weight = ce_weight
        self.feat_weight = feat_weight
        self.eps = eps
        self.learn_variance = learn_variance
        names = s_name, t_name = setting.names
        size = probe_input_size(setting, input_size, "VID.INPUT_SIZE")
        maps_s, maps_t = probed_maps(self.student, self.teacher, size, "VID", names, upstream=upstream_probe)
        s_channels, t_channels = ([f.shape[1] for f in maps[1:]] for maps in (maps_s, maps_t))
        if len(s_channels) > len(t_channels):
            raise MdistillerError(
                f"VID pairs each of student {s_name}'s {len(s_channels)} stages with a teacher stage, but teacher "
                f"{t_name} has {len(t_channels)}; pick a teacher with at least as many stages"
            )
        self.num_stages = len(s_channels)
        self.regressors = nn.ModuleList(vid_regressor(s, t) for s, t in zip(s_channels, t_channels))
        scales = [initial_log_scale(init_pred_var, self.eps, t) for t in t_channels[: self.num_stages]]
        if self.learn_variance:
            self.log_scales = nn.ParameterList(nn.Parameter(s) for s in scales)
        else:  # upstream's untrained, unsaved list: buffers follow .to(device) but stay out of the state dict
            for i, scale in enumerate(scales):
                self.register_buffer(f"log_scale_{i}", scale, persistent=False)

    def stage_log_scales(self) -> list[torch.Tensor]:
        """The per-stage log-scales (parameters with VID.LEARN_VARIANCE, constant buffers otherwise)."""
        if self.learn_variance:
            return list(self.log_scales)
        return [getattr(self, f"log_scale_{i}") for i in range(self.num_stages)]

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **batch) -> tuple[torch.Tensor, dict]:
        logits_student, feats_student = self.student(image)
        _, feats_teacher = self.teacher_forward(image)
        total = 0.0
        maps = zip(feats_student["feats"][1:], feats_teacher["feats"][1:], self.regressors, self.stage_log_scales())
        for f_s, f_t, regressor, log_scale in maps:
            f_s, f_t = pool_to_smaller(f_s, f_t)
            total = total + vid_loss(regressor(f_s), f_t, log_scale, self.eps)
        losses = {
            "loss_ce": self.ce_weight * cross_entropy(logits_student, target),
            "loss_kd": self.feat_weight * total,
        }
        return logits_student, losses
