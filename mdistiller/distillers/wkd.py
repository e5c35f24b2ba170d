"""WKD (Lv et al., NeurIPS 2024): Wasserstein distillation of logits (WKD-L) and of features (WKD-F).

One distiller type `WKD`; each part is on when its weight (WKD.LOSS.WKD_LOGIT_WEIGHT / WKD_FEAT_WEIGHT) is > 0,
as in the reference. Losses (see mdistiller/distillers/ot.py):
- `loss_ce`: CE_WEIGHT * CE;
- WKD-L: `loss_wkd_target` (target-class part, not weighted) + `loss_wkd_logit` (w_logit(e) * OT between the
  non-target distributions under the class cost matrix);
- WKD-F: `loss_wkd_feat` = w_feat(e) * (MEAN_COV_RATIO * mean term + std term) between the projected student hint
  feature and the teacher's.
Both weights decay with a cosine after WKD.LOSS.COSINE_DECAY_EPOCH (strictly later epochs) to 0 at SOLVER.EPOCHS.

Cost matrix (WKD.COST_MATRIX): "fc" = 1 - cosine between the rows of the teacher's final nn.Linear weight; "cka" =
the C x C tensor file WKD.COST_MATRIX_PATH written by tools/wkd_cost_matrix.py (1 - linear CKA). It is sharpened
(`1 - exp(-s M)`, WKD.COST_MATRIX_SHARPEN s != 0), passed through `relu + 1e-8` and kept as a buffer.

Projector (WKD-F), from the student's feats[HINT_LAYER] to the teacher's shape, then BN + ReLU:
- "conv1x1": a 1x1 conv when the spatial sizes match. Otherwise WKD.PROJECTOR_RESIZE "reference" (default) resizes
  as the authors' projector does: a 3x3 stride-2 conv when the student's map is twice the teacher's, a 4x4
  stride-2 transposed conv when it is half (e.g. wrn_40_2 8x8 <- ShuffleV1 4x4), a (1 + dH) x (1 + dW) valid conv
  when it is larger by dH, dW; any other ratio is bilinearly resized first. "interpolate": always a 1x1 conv on the
  student's map bilinearly resized (or area-pooled when shrinking) to the teacher's size.
- "bottleneck": 1x1 conv to 256, 3x3 conv (256 -> 256; the resizing conv of the rule above at 256 channels when
  the sizes differ, because the reference's bottleneck mis-wires that case), 1x1 conv to the teacher's channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MdistillerError
from ..files import resolve_project_path
from ..models.common import classifier
from ._base import FEATURES, LOGITS, Declaration, Distiller, cross_entropy
from .config import Key, config_section
from .ot import (
    cosine_decay_weight,
    fc_cost_matrix,
    gaussian_wasserstein_loss,
    prepare_cost,
    sharpen_cost,
    wkd_logit_loss,
)
from .probe import DEFAULT_SETTING, Setting, map_shapes, probe_features, probe_input_size
from .registry import register_distiller
from .tool_hints import teacher_tool_command

BOTTLENECK_HIDDEN = 256


def final_linear(model: nn.Module) -> nn.Linear:
    """The last nn.Linear of a model (its classifier), whatever its attribute name (fc, linear, classifier)."""
    try:
        return classifier(model)
    except MdistillerError as exc:
        raise MdistillerError(f"{exc}: WKD.COST_MATRIX fc needs one") from None


class Resize(nn.Module):
    """Spatial resize to a fixed size: bilinear when growing, area (average) pooling when shrinking."""

    def __init__(self, size: tuple[int, int]):
        super().__init__()
        self.size = tuple(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == self.size:
            return x
        if x.shape[-2] >= self.size[0] and x.shape[-1] >= self.size[1]:
            return F.adaptive_avg_pool2d(x, self.size)
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}"


def resizing_conv(c_in: int, c_out: int, s_hw: tuple[int, int], t_hw: tuple[int, int], resize: str,
                  same_size_kernel: int = 1) -> nn.Module:
    """A conv from c_in to c_out channels that also maps the spatial size s_hw to t_hw (see the module docstring)."""
    def same() -> nn.Conv2d:
        return nn.Conv2d(c_in, c_out, kernel_size=same_size_kernel, padding=same_size_kernel // 2)

    if s_hw == t_hw:
        return same()
    if resize == "reference":
        (s_h, s_w), (t_h, t_w) = s_hw, t_hw
        if s_h == 2 * t_h and s_w == 2 * t_w:
            return nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1)
        if 2 * s_h == t_h and 2 * s_w == t_w:
            return nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1)
        if s_h >= t_h and s_w >= t_w and same_size_kernel == 1:
            return nn.Conv2d(c_in, c_out, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
    elif resize != "interpolate":
        raise MdistillerError(f"WKD.PROJECTOR_RESIZE must be 'reference' or 'interpolate', got {resize!r}")
    return nn.Sequential(Resize(t_hw), same())


def build_projector(kind: str, s_shape: tuple, t_shape: tuple, resize: str = "reference") -> nn.Module:
    """WKD-F projector from a student map (N, C_s, H_s, W_s) to the teacher's (N, C_t, H_t, W_t): convs + BN + ReLU."""
    _, s_c, s_h, s_w = s_shape
    _, t_c, t_h, t_w = t_shape
    if kind == "conv1x1":
        layers = [resizing_conv(s_c, t_c, (s_h, s_w), (t_h, t_w), resize)]
    elif kind == "bottleneck":
        layers = [
            nn.Conv2d(s_c, BOTTLENECK_HIDDEN, kernel_size=1),
            resizing_conv(BOTTLENECK_HIDDEN, BOTTLENECK_HIDDEN, (s_h, s_w), (t_h, t_w), resize, same_size_kernel=3),
            nn.Conv2d(BOTTLENECK_HIDDEN, t_c, kernel_size=1),
        ]
    else:
        raise MdistillerError(f"WKD.PROJECTOR must be 'conv1x1' or 'bottleneck', got {kind!r}")
    return nn.Sequential(*layers, nn.BatchNorm2d(t_c), nn.ReLU(inplace=True))


def load_cost_matrix(path: str, make_command: str) -> torch.Tensor:
    """The C x C tensor saved by tools/wkd_cost_matrix.py; a missing file says how to make it."""
    if not path:
        raise MdistillerError("WKD.COST_MATRIX cka needs WKD.COST_MATRIX_PATH (made by tools/wkd_cost_matrix.py)")
    resolved = resolve_project_path(path)
    try:
        cost = torch.load(resolved, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MdistillerError(
            f"WKD cost matrix not found: {path}. Make it with: {make_command}"
        ) from None
    except Exception as exc:  # a corrupt file: torch raises many types
        raise MdistillerError(f"WKD cost matrix {resolved} is unreadable ({type(exc).__name__}: {exc})") from None
    if not torch.is_tensor(cost) or cost.dim() != 2 or cost.shape[0] != cost.shape[1]:
        shape = tuple(cost.shape) if torch.is_tensor(cost) else type(cost).__name__
        raise MdistillerError(f"WKD cost matrix {resolved} must hold a C x C tensor, got {shape}")
    return cost.float()


def cost_matrix_command(cfg, out: str) -> str:
    """The tools/wkd_cost_matrix.py command line that writes `out` for this config's teacher and data."""
    return teacher_tool_command("wkd_cost_matrix.py", cfg, out)


config_section("WKD", {
    "TEMPERATURE": Key(4.0, "temperature of WKD-L's distributions"),
    "INPUT_SIZE": Key((32, 32), "input of the dry forward that reads WKD-F's feature shapes"),
    "LOSS": {
        "CE_WEIGHT": Key(1.0, "weight of the cross-entropy with the labels"),
        "WKD_LOGIT_WEIGHT": Key(0.0, "weight of WKD-L (0: off)"),
        "WKD_FEAT_WEIGHT": Key(0.0, "weight of WKD-F (0: off)"),
        "COSINE_DECAY_EPOCH": Key(150, "epoch from which both weights decay along a cosine"),
    },
    "SINKHORN": {
        "LAMBDA": Key(0.05, "entropic regularisation of the Sinkhorn iterations"),
        "ITER": Key(10, "Sinkhorn iterations"),
        "LOG_DOMAIN": Key(False, "ours: log-domain Sinkhorn, finite for small LAMBDA (reference: multiplicative)"),
    },
    "COST_MATRIX": Key("fc", "category cost: 'fc' (teacher classifier weights) or 'cka' (a file)", ("fc", "cka")),
    "COST_MATRIX_PATH": Key("", "the CKA cost matrix file (tools/wkd_cost_matrix.py)"),
    "COST_MATRIX_SHARPEN": Key(0.0, "sharpening of the cost matrix (0: none)"),
    "EPS": Key(1e-5, "variance floor of WKD-F's Gaussians"),
    "HINT_LAYER": Key(-1, "feats index WKD-F compares"),
    "MEAN_COV_RATIO": Key(2.0, "weight of the mean term against the covariance term"),
    "PROJECTOR": Key("conv1x1", "WKD-F's projector", ("conv1x1", "bottleneck")),
    "SPATIAL_GRID": Key(1, "WKD-F's Gaussians per side of the map"),
    "PROJECTOR_RESIZE": Key("reference", "ours: 'reference' (the authors' resizing convs) | 'interpolate'",
                            ("reference", "interpolate")),
})


def wkd_teacher_reads(hparams) -> dict[str, frozenset[str]]:
    """WKD-L reads the teacher's logits, WKD-F its features."""
    uses = {LOGITS} if hparams["logit_weight"] > 0 else set()
    if hparams["feat_weight"] > 0:
        uses.add(FEATURES)
    return {"image": frozenset(uses)}


@register_distiller("WKD")
class WKD(Distiller):
    """WKD-L and/or WKD-F, switched on by their weights; see the module docstring."""

    declares = Declaration(
        loss_terms=("loss_ce", "loss_wkd_target", "loss_wkd_logit", "loss_wkd_feat"),
        distillation_terms=("loss_wkd_target", "loss_wkd_logit", "loss_wkd_feat"),
        config_sections=("WKD",),
        teacher_reads=wkd_teacher_reads,
        extra_modules=("projector",),
        logit_stand_refusal=("--logit-stand is not defined for WKD: its logit part compares distributions by optimal "
                             "transport, which the logit-standardisation paper does not cover; tune WKD.TEMPERATURE "
                             "instead"),
    )

    @classmethod
    def from_config(cls, cfg) -> dict:
        wkd = cfg.WKD
        return {
            "ce_weight": wkd.LOSS.CE_WEIGHT, "logit_weight": wkd.LOSS.WKD_LOGIT_WEIGHT,
            "feat_weight": wkd.LOSS.WKD_FEAT_WEIGHT, "decay_epoch": wkd.LOSS.COSINE_DECAY_EPOCH,
            "total_epochs": cfg.SOLVER.EPOCHS, "temperature": wkd.TEMPERATURE, "sinkhorn_lambda": wkd.SINKHORN.LAMBDA,
            "sinkhorn_iters": wkd.SINKHORN.ITER, "log_domain": bool(wkd.SINKHORN.LOG_DOMAIN),
            "cost_matrix": wkd.COST_MATRIX, "cost_matrix_path": wkd.COST_MATRIX_PATH,
            "cost_matrix_command": cost_matrix_command(cfg, wkd.COST_MATRIX_PATH),
            "cost_matrix_sharpen": wkd.COST_MATRIX_SHARPEN, "mean_cov_ratio": wkd.MEAN_COV_RATIO, "eps": wkd.EPS,
            "hint_layer": wkd.HINT_LAYER, "spatial_grid": wkd.SPATIAL_GRID, "projector": wkd.PROJECTOR,
            "projector_resize": wkd.PROJECTOR_RESIZE, "input_size": tuple(wkd.INPUT_SIZE),
            "setting": Setting.from_cfg(cfg),
        }

    def setup(self, ce_weight: float, logit_weight: float, feat_weight: float, decay_epoch: int, total_epochs: int,
              temperature: float = 4.0, sinkhorn_lambda: float = 0.05, sinkhorn_iters: int = 10,
              log_domain: bool = False, cost_matrix: str = "fc", cost_matrix_path: str = "",
              cost_matrix_command: str = "python tools/wkd_cost_matrix.py", cost_matrix_sharpen: float = 0.0,
              mean_cov_ratio: float = 2.0, eps: float = 1e-5, hint_layer: int = -1, spatial_grid: int = 1,
              projector: str = "conv1x1", projector_resize: str = "reference", input_size=(32, 32),
              setting: Setting = DEFAULT_SETTING) -> None:
        student, teacher = self.student, self.teacher
        self.ce_weight = ce_weight
        self.logit_weight = logit_weight
        self.feat_weight = feat_weight
        self.decay_epoch = decay_epoch
        self.total_epochs = total_epochs
        self.use_logit = self.logit_weight > 0
        self.use_feat = self.feat_weight > 0
        self._epoch: int | None = None

        if self.use_logit:
            self.temperature = temperature
            self.sinkhorn_lambda = sinkhorn_lambda
            self.sinkhorn_iters = sinkhorn_iters
            self.log_domain = log_domain
            if cost_matrix == "fc":
                cost = fc_cost_matrix(final_linear(teacher).weight.detach())
            elif cost_matrix == "cka":
                cost = load_cost_matrix(cost_matrix_path, cost_matrix_command)
            else:
                raise MdistillerError(f"WKD.COST_MATRIX must be 'fc' or 'cka', got {cost_matrix!r}")
            num_classes = final_linear(teacher).out_features
            if cost.shape[0] != num_classes:
                raise MdistillerError(
                    f"WKD cost matrix is {cost.shape[0]} x {cost.shape[1]} but the teacher has {num_classes} classes"
                    f" ({cost_matrix_path or 'fc'}); regenerate it with tools/wkd_cost_matrix.py"
                )
            # recomputed from the config at every build, so kept out of checkpoints
            self.register_buffer("cost_matrix", prepare_cost(sharpen_cost(cost, cost_matrix_sharpen)),
                                 persistent=False)

        if self.use_feat:
            self.mean_cov_ratio = mean_cov_ratio
            self.eps = eps
            self.hint_layer = hint_layer
            self.spatial_grid = spatial_grid
            probe_size = probe_input_size(setting, input_size, "WKD.INPUT_SIZE")
            s_shapes, t_shapes = (map_shapes(f) for f in probe_features((student, teacher), probe_size))
            for name, shapes in (("student", s_shapes), ("teacher", t_shapes)):
                if not -len(shapes) <= self.hint_layer < len(shapes):
                    raise MdistillerError(
                        f"WKD.HINT_LAYER {self.hint_layer} is out of range: the {name} has {len(shapes)} feature maps"
                    )
            t_shape = t_shapes[self.hint_layer]
            grid = max(self.spatial_grid, 1)
            if self.spatial_grid < 1 or (t_shape[2] // grid) * (t_shape[3] // grid) < 2:
                raise MdistillerError(
                    f"WKD.SPATIAL_GRID {self.spatial_grid} leaves cells of fewer than 2 positions on the teacher's "
                    f"{t_shape[2]}x{t_shape[3]} map (a std needs 2)"
                )
            self.projector = build_projector(projector, s_shapes[self.hint_layer], t_shape, projector_resize)

    def current_weights(self, epoch: int | None) -> tuple[float, float]:
        """(w_logit(e), w_feat(e)) after the cosine decay."""
        return (
            cosine_decay_weight(self.logit_weight, epoch, self.decay_epoch, self.total_epochs),
            cosine_decay_weight(self.feat_weight, epoch, self.decay_epoch, self.total_epochs),
        )

    def epoch_metrics(self) -> dict[str, float]:
        w_logit, w_feat = self.current_weights(self._epoch)
        metrics = {}
        if self.use_logit:
            metrics["wkd_logit_weight"] = w_logit
        if self.use_feat:
            metrics["wkd_feat_weight"] = w_feat
        return metrics

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, epoch: int | None = None,
                      **batch) -> tuple[torch.Tensor, dict]:
        self._epoch = epoch
        logits_student, feats_student = self.student(image)
        if self.use_feat:
            logits_teacher, feats_teacher = self.teacher_forward(image)
        else:  # WKD-L alone: the logits may come from the teacher-output cache
            logits_teacher = self.teacher_logits(image, batch.get("teacher_logits"))
        w_logit, w_feat = self.current_weights(epoch)
        losses = {"loss_ce": self.ce_weight * cross_entropy(logits_student, target)}
        if self.use_logit:
            target_part, ot_part = wkd_logit_loss(
                logits_student, logits_teacher, target, self.cost_matrix, self.temperature,
                self.sinkhorn_lambda, self.sinkhorn_iters, self.log_domain,
            )
            losses["loss_wkd_target"] = target_part
            losses["loss_wkd_logit"] = w_logit * ot_part
        if self.use_feat:
            f_s = self.projector(feats_student["feats"][self.hint_layer].float())
            f_t = feats_teacher["feats"][self.hint_layer].float()
            losses["loss_wkd_feat"] = w_feat * gaussian_wasserstein_loss(
                f_s, f_t, self.mean_cov_ratio, self.eps, self.spatial_grid
            )
        return logits_student, losses
