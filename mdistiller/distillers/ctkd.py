"""CTKD (Li et al., AAAI 2023): a learnable distillation temperature trained adversarially through gradient reversal.

`tau = T_START + T_END * sigmoid(theta)`; theta reaches the loss through a gradient-reversal layer whose backward
multiplies the gradient by `lambda(e) = -LAMBDA_MAX * (1 - cos(pi * min(e, N) / N)) / 2` (0 at e = 0, -LAMBDA_MAX from
e = N = COSINE_EPOCHS), e the 1-based training epoch as the reference's loop counts it. The student descends the
distillation loss; theta, updated by the same SGD, ascends it, more and more strongly. theta is a parameter of the
distiller outside the teacher, so the trainer's optimizer picks it up (same LR and weight decay as the student).

CTKD.BASE "KD": `KD.LOSS.CE_WEIGHT * CE + KD.LOSS.KD_WEIGHT * tau^2 * KL(tau)`;
CTKD.BASE "DKD": `DKD.CE_WEIGHT * CE + DKD.ALPHA * TCKD(tau) + DKD.BETA * NCKD(tau)`, no warm-up (as the reference).
CTKD.INSTANCE True: a 2-layer MLP over the concatenated (detached) teacher and student logits gives one temperature
per sample (the reference for this variant is unpublished; this is our construction).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MdistillerError
from ..models.common import classifier
from ._base import Declaration, Distiller, cross_entropy, logits_on
from .config import Key, config_section
from .dkd import dkd_loss
from .kd import kd_loss
from .precision import fp32_loss
from .registry import register_distiller


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by `lambda_` (CTKD's lambda is <= 0)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lambda_: float) -> torch.Tensor:
        ctx.lambda_ = float(lambda_)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.lambda_, None


def gradient_reversal(x: torch.Tensor, lambda_: float) -> torch.Tensor:
    """`x` unchanged forward; gradient times `lambda_` backward."""
    return GradientReversal.apply(x, lambda_)


def ctkd_lambda(epoch: float, cosine_epochs: float, lambda_max: float = 1.0) -> float:
    """`-lambda_max * (1 - cos(pi * min(e, N) / N)) / 2`: 0 at e <= 0, -lambda_max from e = N on."""
    if cosine_epochs <= 0:
        return -float(lambda_max)
    e = min(max(float(epoch), 0.0), float(cosine_epochs))
    return -float(lambda_max) * (1.0 - math.cos(math.pi * e / cosine_epochs)) / 2.0


def temperature_from(raw: torch.Tensor, t_start: float, t_end: float) -> torch.Tensor:
    """`t_start + t_end * sigmoid(raw)`: a temperature in (t_start, t_start + t_end)."""
    return t_start + t_end * torch.sigmoid(raw)


@fp32_loss
def per_sample_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperatures: torch.Tensor):
    """`mean_i tau_i^2 * KL(softmax(z_t,i / tau_i) || softmax(z_s,i / tau_i))`, temperatures (B,) (fp32)."""
    tau = temperatures.float().reshape(-1, 1)
    log_p_s = F.log_softmax(student_logits.float() / tau, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / tau, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1)
    return (kl * tau.reshape(-1) ** 2).mean()


class GlobalTemperature(nn.Module):
    """One learnable scalar theta behind gradient reversal; forward gives the (0-d) temperature."""

    def __init__(self, t_start: float = 1.0, t_end: float = 20.0, init: float = 1.0):
        super().__init__()
        self.t_start = float(t_start)
        self.t_end = float(t_end)
        self.theta = nn.Parameter(torch.full((1,), float(init)))

    def forward(self, lambda_: float) -> torch.Tensor:
        return temperature_from(gradient_reversal(self.theta, lambda_), self.t_start, self.t_end).reshape(())

    @torch.no_grad()
    def value(self) -> float:
        """The current temperature."""
        return float(temperature_from(self.theta, self.t_start, self.t_end))


class InstanceTemperature(nn.Module):
    """A 2-layer MLP over `[teacher logits, student logits]` (detached) behind gradient reversal: temperatures (B,)."""

    def __init__(self, num_classes: int, hidden: int = 256, t_start: float = 1.0, t_end: float = 20.0):
        super().__init__()
        self.t_start = float(t_start)
        self.t_end = float(t_end)
        self.mlp = nn.Sequential(nn.Linear(2 * num_classes, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def forward(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor, lambda_: float) -> torch.Tensor:
        # detached inputs: the reversed gradient trains the MLP only, never the student through its logits
        features = torch.cat([teacher_logits.detach(), student_logits.detach()], dim=1).float()
        raw = gradient_reversal(self.mlp(features), lambda_)
        return temperature_from(raw, self.t_start, self.t_end).reshape(-1)


config_section("CTKD", {
    "BASE": Key("KD", "the wrapped loss: KD (KD.LOSS.*) or DKD (DKD.*); either case"),
    "T_START": Key(1.0, "temperature = T_START + T_END * sigmoid(theta)"),
    "T_END": Key(20.0, "see T_START"),
    "INIT": Key(1.0, "initial theta (the global temperature's parameter)"),
    "COSINE_EPOCHS": Key(10, "epochs of the cosine schedule of lambda; 10 on CIFAR, 5 on ImageNet"),
    "LAMBDA_MAX": Key(1.0, "|lambda| reached after COSINE_EPOCHS"),
    "INSTANCE": Key(False, "True: a per-sample temperature from an MLP over [teacher, student] logits"),
    "MLP_HIDDEN": Key(256, "hidden width of the instance-temperature MLP"),
})


def ctkd_logit_stand(cfg, base_temp: float, kd_weight: float) -> None:
    """The learned temperature replaces tau; the weight scales the wrapped loss as it would without CTKD."""
    cfg.KD.LOSS.KD_WEIGHT = float(kd_weight)
    if cfg.CTKD.BASE.upper() == "DKD":
        cfg.DKD.ALPHA = float(cfg.DKD.ALPHA * kd_weight)
        cfg.DKD.BETA = float(cfg.DKD.BETA * kd_weight)


@register_distiller("CTKD")
class CTKD(Distiller):
    """KD (or DKD) at a learned, adversarially scheduled temperature."""

    declares = Declaration(
        loss_terms=("loss_ce", "loss_kd"),
        distillation_terms=("loss_kd",),
        config_sections=("CTKD", "KD", "DKD"),
        teacher_reads=logits_on("image"),
        extra_modules=("temperature_module",),
        logit_stand=ctkd_logit_stand,
    )

    @classmethod
    def from_config(cls, cfg) -> dict:
        ctkd = cfg.CTKD
        base = ctkd.BASE.upper()
        if base not in ("KD", "DKD"):
            raise MdistillerError(f"CTKD.BASE must be 'KD' or 'DKD', got {ctkd.BASE!r}")
        if base == "KD":
            weights = {"ce_weight": cfg.KD.LOSS.CE_WEIGHT, "kd_weight": cfg.KD.LOSS.KD_WEIGHT}
        else:
            weights = {"ce_weight": cfg.DKD.CE_WEIGHT, "alpha": cfg.DKD.ALPHA, "beta": cfg.DKD.BETA}
        return {"base": base, **weights, "t_start": ctkd.T_START, "t_end": ctkd.T_END, "init": ctkd.INIT,
                "cosine_epochs": ctkd.COSINE_EPOCHS, "lambda_max": ctkd.LAMBDA_MAX, "instance": bool(ctkd.INSTANCE),
                "mlp_hidden": ctkd.MLP_HIDDEN}

    def setup(self, base: str, ce_weight: float, kd_weight: float = 1.0, alpha: float = 1.0, beta: float = 8.0,
              t_start: float = 1.0, t_end: float = 20.0, init: float = 1.0, cosine_epochs: float = 10,
              lambda_max: float = 1.0, instance: bool = False, mlp_hidden: int = 256) -> None:
        if base not in ("KD", "DKD"):
            raise MdistillerError(f"CTKD.BASE must be 'KD' or 'DKD', got {base!r}")
        self.base = base
        self.ce_weight, self.kd_weight, self.alpha, self.beta = ce_weight, kd_weight, alpha, beta
        self.cosine_epochs = cosine_epochs
        self.lambda_max = lambda_max
        self.instance = instance
        if instance:
            self.temperature_module = InstanceTemperature(classifier(self.student).out_features, mlp_hidden,
                                                          t_start, t_end)
        else:
            self.temperature_module = GlobalTemperature(t_start, t_end, init)
        self._lambda = ctkd_lambda(0, self.cosine_epochs, self.lambda_max)
        self._metric_epoch = None
        self._temperature_sum = None
        self._temperature_count = 0

    def temperature(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor, lambda_: float) -> torch.Tensor:
        """The temperature for this batch: 0-d (global) or (B,) (instance)."""
        if self.instance:
            return self.temperature_module(teacher_logits, student_logits, lambda_)
        return self.temperature_module(lambda_)

    def distillation_loss(self, student_logits, teacher_logits, target, temperature: torch.Tensor) -> torch.Tensor:
        """The wrapped loss (weighted) at `temperature`, on the logits as given."""
        if self.base == "KD":
            if temperature.dim() == 0:
                return self.kd_weight * kd_loss(student_logits, teacher_logits, temperature)
            return self.kd_weight * per_sample_kd_loss(student_logits, teacher_logits, temperature)
        tau = temperature if temperature.dim() == 0 else temperature.reshape(-1, 1)
        return dkd_loss(student_logits, teacher_logits, target, self.alpha, self.beta, tau)

    def _record(self, epoch: int, temperature: torch.Tensor) -> None:
        if epoch != self._metric_epoch:
            self._metric_epoch = epoch
            self._temperature_sum = torch.zeros((), device=temperature.device)
            self._temperature_count = 0
        self._temperature_sum = self._temperature_sum + temperature.detach().float().mean()
        self._temperature_count += 1

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, *, epoch: int, **batch):
        logits_student, _ = self.student(image)
        logits_teacher = self.teacher_logits(image, batch.get("teacher_logits"))
        self._lambda = ctkd_lambda(epoch, self.cosine_epochs, self.lambda_max)
        temperature = self.temperature(logits_teacher, logits_student, self._lambda)
        if self.instance:
            self._record(epoch, temperature)
        student_kd, teacher_kd = self.distill_logits(logits_student, logits_teacher)
        losses = {
            "loss_ce": self.ce_weight * cross_entropy(logits_student, target),
            "loss_kd": self.distillation_loss(student_kd, teacher_kd, target, temperature),
        }
        return logits_student, losses

    def epoch_metrics(self) -> dict[str, float]:
        """The temperature (global: its current value; instance: the epoch's batch mean) and lambda."""
        metrics = {"ctkd_lambda": self._lambda}
        if not self.instance:
            metrics["ctkd_temperature"] = self.temperature_module.value()
        elif self._temperature_count:
            metrics["ctkd_temperature"] = float(self._temperature_sum) / self._temperature_count
        return metrics
