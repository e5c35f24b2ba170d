"""SDD (Wei et al., CVPR 2024): scale-decoupled distillation over pooled regions (spec recent.md §5): `SDD_KD`,
`SDD_DKD`, `SDD_NKD` (the authors' names and keys: SDD.M, KD.*, DKD.*).

Region logits are (B, C, N): each model's own classifier (weight and bias) applied to each region vector of
`spatial_pyramid` over its pre-pool map (`feats["prepool"]`); the student's with gradient, the teacher's under
no_grad. The losses flatten them region-major (row `n * B + b`, as the reference's permute(2, 0, 1) + reshape) and
weight each row by `region_weights`, then return `sum(weight * row) / (N * B)` (shicaiwei123/SDD-CVPR2024 `KD.py`,
`SDD_DKD.py`, `SDD_nkd.py`). Region 0 must be the global region (SDD.M starts with 1), as the row weights assume.

"Right" in the row weights is the TEACHER's prediction on that row (argmax of its region logits) against the label,
and "global" is the teacher's prediction on region 0 of the same sample; the student's logits play no part. Under
torchrun they are per-rank batch computations, as the reference's.

With N = 1 (`M = [1]`, pass `logits.unsqueeze(2)`) every row weight is 1 and each loss is its plain batch-mean form
(KD, mdistiller's DKD, NKD with the label column kept): the reference's `M == '[1]'` branches, which the distillers
take on the ordinary logits (teacher logits only: the teacher-output cache can serve them).

The reference's whole-loss guard (a NaN/inf region loss becomes a fresh 0) is `guarded`, decided on the device without
a host read, exact in value and in gradient (none); see its docstring. The authors' `--M` / `--warmup` flags are
`sdd_flag_overrides` (tools/train.py).
"""

from __future__ import annotations

import ast
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import MdistillerError
from ..models.common import classify_regions, prepool_map
from ._base import FEATURES, LOGITS, Declaration, Distiller, cross_entropy
from .config import Key, config_section
from .dkd import dkd_loss, dkd_terms, dkd_warmup
from .kd import kd_loss
from .precision import fp32_loss
from .registry import get_distiller_class, register_distiller

ALLOWED_SCALES = (1, 2, 4)
COMPLEMENTARY_WEIGHT = 2.0  # hard-coded in the reference


def check_scales(scales: Sequence[int]) -> tuple[int, ...]:
    """`scales` as a tuple, refused unless a non-empty, strictly increasing subset of (1, 2, 4) (SDD.M)."""
    values = tuple(scales)
    if (
        not values
        or any(isinstance(s, bool) or not isinstance(s, int) or s not in ALLOWED_SCALES for s in values)
        or list(values) != sorted(set(values))
    ):
        raise MdistillerError(
            f"SDD scales (SDD.M) must be a strictly increasing subset of [1, 2, 4], such as [1, 2, 4] or [1, 2]; "
            f"got {list(values)}"
        )
    return values


def method_scales(scales: Sequence[int]) -> tuple[int, ...]:
    """SDD.M for the losses: `check_scales`, starting with 1 (region 0 is the global region the row weights compare
    every region against)."""
    values = check_scales(scales)
    if values[0] != 1:
        raise MdistillerError(f"SDD.M must start with 1 (region 0 is the global region the row weights compare "
                              f"against), such as [1, 2, 4] or [1, 2]; got {list(values)}")
    return values


def spatial_pyramid(prepool_map: torch.Tensor, scales: Sequence[int] = (1, 2, 4)) -> torch.Tensor:
    """Region vectors (B, D, N) of a pre-pool map (B, D, H, W): P4 = avgpool(X, 4x4), P2 and P1 pooled from P4."""
    scales = check_scales(scales)
    if prepool_map.dim() != 4:
        raise MdistillerError(f"SDD needs a pre-pool map (B, D, H, W), got shape {tuple(prepool_map.shape)}")
    p4 = F.adaptive_avg_pool2d(prepool_map, 4)
    pooled = {4: p4, 2: F.adaptive_avg_pool2d(p4, 2), 1: F.adaptive_avg_pool2d(p4, 1)}
    return torch.cat([pooled[s].flatten(2) for s in scales], dim=2)  # row-major within a scale


def region_rows(region_logits: torch.Tensor) -> torch.Tensor:
    """(B, C, N) region logits as (N * B, C) rows, region-major (row n * B + b)."""
    if region_logits.dim() != 3:
        raise MdistillerError(f"SDD region logits must be (B, C, N), got shape {tuple(region_logits.shape)}")
    batch, classes, regions = region_logits.shape
    return region_logits.permute(2, 0, 1).reshape(regions * batch, classes)


def _check_pair(region_s: torch.Tensor, region_t: torch.Tensor, target: torch.Tensor) -> None:
    if region_s.shape != region_t.shape or region_s.dim() != 3:
        raise MdistillerError(
            f"SDD needs student and teacher region logits of one shape (B, C, N), got {tuple(region_s.shape)} and "
            f"{tuple(region_t.shape)}"
        )
    if target.shape != (region_s.shape[0],):
        raise MdistillerError(f"SDD targets must be ({region_s.shape[0]},) labels, got shape {tuple(target.shape)}")


@torch.no_grad()
def region_weights(teacher_region_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Row weights (N * B,): 2 where the teacher's local and global predictions disagree on rightness, else 1."""
    rows = region_rows(teacher_region_logits)
    regions = teacher_region_logits.shape[2]
    right = rows.argmax(dim=1) == target.repeat(regions)
    global_right = right[: target.shape[0]].repeat(regions)  # region 0 of each sample; its own rows XOR to False
    return torch.where(right ^ global_right, COMPLEMENTARY_WEIGHT, 1.0).float()


def _weighted_mean(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (rows * weights).sum() / rows.shape[0]


@fp32_loss
def sdd_kd_loss(
    region_s: torch.Tensor, region_t: torch.Tensor, target: torch.Tensor, temperature: float
) -> torch.Tensor:
    """SD-KD: `sum_rows weight * T^2 KL(p_t || p_s) / (N * B)` over region rows, NaN KL entries set to 0 (fp32)."""
    _check_pair(region_s, region_t, target)
    log_p_s = F.log_softmax(region_rows(region_s.float()) / temperature, dim=1)
    p_t = F.softmax(region_rows(region_t.detach().float()) / temperature, dim=1)
    kl = F.kl_div(log_p_s, p_t, reduction="none") * temperature**2
    kl = torch.where(torch.isnan(kl), torch.zeros_like(kl), kl)  # the reference zeroes NaN entries (KD only)
    return _weighted_mean(kl.sum(1), region_weights(region_t, target))


@fp32_loss
def sdd_dkd_loss(
    region_s: torch.Tensor,
    region_t: torch.Tensor,
    target: torch.Tensor,
    alpha: float,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """SD-DKD: `sum_rows weight * (alpha TCKD + beta NCKD) / (N * B)`, per-row DKD terms at T (fp32)."""
    _check_pair(region_s, region_t, target)
    regions = region_s.shape[2]
    tckd, nckd = dkd_terms(
        region_rows(region_s.float()), region_rows(region_t.detach().float()), target.repeat(regions), temperature
    )
    return _weighted_mean(alpha * tckd + beta * nckd, region_weights(region_t, target))


@fp32_loss
def nkd_keep_label_rows(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, temperature: float, gamma: float
) -> torch.Tensor:
    """Per-row NKD as SDD's reference: `-p_t[y] log p_s[y] - gamma T^2 sum_c q_t,c log q_s,c`, label column KEPT."""
    z_s = student_logits.float()
    z_t = teacher_logits.detach().float()
    label = target.view(-1, 1)
    target_part = -F.softmax(z_t, dim=1).gather(1, label) * F.log_softmax(z_s, dim=1).gather(1, label)
    soft = (F.softmax(z_t / temperature, dim=1) * F.log_softmax(z_s / temperature, dim=1)).sum(1)
    return target_part.squeeze(1) - gamma * temperature**2 * soft


@fp32_loss
def sdd_nkd_loss(
    region_s: torch.Tensor, region_t: torch.Tensor, target: torch.Tensor, temperature: float, gamma: float
) -> torch.Tensor:
    """SD-NKD: `sum_rows weight * NKD_row / (N * B)`, NKD with the label column kept (SDD's reference) (fp32)."""
    _check_pair(region_s, region_t, target)
    regions = region_s.shape[2]
    rows = nkd_keep_label_rows(region_rows(region_s), region_rows(region_t), target.repeat(regions), temperature, gamma)
    return _weighted_mean(rows, region_weights(region_t, target))


def guarded(loss_fn: Callable[..., torch.Tensor], region_s: torch.Tensor, *args) -> torch.Tensor:
    """`loss_fn(region_s, *args)`, or 0 with no gradient at all when that is NaN/inf: the reference's whole-loss
    guard, without a host read.

    The reference tests the loss on the host and returns a fresh zero. Here a first evaluation under no_grad gives the
    verdict as a device tensor; the student's region logits enter the second one through
    `where(finite, region_s, region_s.detach())`, so a guarded term sends exactly zero gradient (a bare
    `where(isfinite(loss), loss, 0)` would still send NaN where an intermediate's backward is itself non-finite, as
    log(0) in TCKD is). The two evaluations are the same computation: the value is the unguarded one when finite.
    """
    with torch.no_grad():
        finite = torch.isfinite(loss_fn(region_s, *args))
    loss = loss_fn(torch.where(finite, region_s, region_s.detach()), *args)
    return torch.where(finite, loss, torch.zeros_like(loss))


def _parse_scales(text: str) -> list[int]:
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        value = None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise MdistillerError(f"--M takes a list of scales as the SDD authors write it, e.g. --M \"[1,2,4]\"; got "
                              f"{text!r}")
    return list(method_scales(value))


def _parse_warmup(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 0 or value != int(value):
        raise MdistillerError(f"--warmup takes a whole number of epochs (DKD.WARMUP), e.g. --warmup 20; got {text!r}")
    return int(value)


def sdd_flag_overrides(cfg, scales: str | None, warmup: str | None) -> list[str]:
    """SDD's `--M "[1,2]"` and `--warmup W` as the overrides `SDD.M [1,2]` and `DKD.WARMUP W` (so the merged config
    and the run name record them); refused in one line for a method that does not read them. [] when neither is
    given."""
    if scales is None and warmup is None:
        return []
    sections = get_distiller_class(cfg.DISTILLER.TYPE).declares.config_sections
    overrides = []
    if scales is not None:
        if "SDD" not in sections:
            raise MdistillerError(f"--M sets SDD's scales (SDD.M), which DISTILLER.TYPE {cfg.DISTILLER.TYPE} does not "
                                  f"read: it applies to SDD_KD, SDD_DKD and SDD_NKD")
        overrides += ["SDD.M", "[" + ",".join(str(s) for s in _parse_scales(scales)) + "]"]
    if warmup is not None:
        if "SDD" not in sections or "DKD" not in sections:
            raise MdistillerError(f"--warmup sets SD-DKD / SD-NKD's warm-up (DKD.WARMUP), which DISTILLER.TYPE "
                                  f"{cfg.DISTILLER.TYPE} does not read: it applies to SDD_DKD and SDD_NKD (SD-KD has "
                                  f"no warm-up: the authors' KD.py comments it out)")
        overrides += ["DKD.WARMUP", str(_parse_warmup(warmup))]
    return overrides


config_section("SDD", {
    "M": Key([1, 2, 4], "the scales of the spatial pyramid, a strictly increasing subset of [1, 2, 4] (the authors' "
                        "--M; [1]: the plain loss on the ordinary logits)"),
})

LOGIT_STAND_REFUSAL = ("--logit-stand: the SDD authors never standardise logits; logit standardisation is refused for "
                       "SDD_KD, SDD_DKD and SDD_NKD")


def _teacher_reads(hparams) -> dict[str, frozenset[str]]:
    # M = [1] uses the ordinary logits only: the teacher-output cache can serve it
    if tuple(hparams["scales"]) == (1,):
        return {"image": frozenset({LOGITS})}
    return {"image": frozenset({LOGITS, FEATURES})}


class _ScaleDecoupled(Distiller):
    """What the three SDD methods share: student and teacher region logits over the pyramid of their pre-pool maps,
    through each model's own classifier (weight and bias); the student's with gradient, the teacher's without."""

    scales: tuple[int, ...]

    def outputs(self, image: torch.Tensor, cached_teacher_logits: torch.Tensor | None = None):
        """(student logits, teacher logits, student region logits, teacher region logits); the region logits are
        None under M = [1]."""
        logits_student, feats_student = self.student(image)
        if self.scales == (1,):
            return logits_student, self.teacher_logits(image, cached_teacher_logits), None, None
        logits_teacher, feats_teacher = self.teacher_forward(image)
        region_student = classify_regions(
            self.student, spatial_pyramid(prepool_map(feats_student, "the student"), self.scales))
        with torch.no_grad():
            region_teacher = classify_regions(
                self.teacher, spatial_pyramid(prepool_map(feats_teacher, "the teacher"), self.scales))
        return logits_student, logits_teacher, region_student, region_teacher


def _sdd_declaration(sections: tuple[str, ...]) -> Declaration:
    return Declaration(
        loss_terms=("loss_ce", "loss_kd"),
        distillation_terms=("loss_kd",),
        config_sections=("SDD", *sections),
        teacher_reads=_teacher_reads,
        logit_stand_refusal=LOGIT_STAND_REFUSAL,
    )


@register_distiller("SDD_KD")
class SDD_KD(_ScaleDecoupled):  # noqa: N801 (the authors' DISTILLER.TYPE)
    """SD-KD: `KD.LOSS.CE_WEIGHT * CE + KD.LOSS.KD_WEIGHT * sdd_kd_loss(KD.TEMPERATURE)`, guarded; no warm-up (the
    reference comments it out). M = [1]: plain KD."""

    declares = _sdd_declaration(("KD",))

    @classmethod
    def from_config(cls, cfg) -> dict:
        return {"scales": method_scales(cfg.SDD.M), "temperature": cfg.KD.TEMPERATURE,
                "ce_weight": cfg.KD.LOSS.CE_WEIGHT, "kd_weight": cfg.KD.LOSS.KD_WEIGHT}

    def setup(self, scales: Sequence[int] = (1, 2, 4), temperature: float = 4.0, ce_weight: float = 0.1,
              kd_weight: float = 0.9) -> None:
        self.scales = method_scales(scales)
        self.temperature, self.ce_weight, self.kd_weight = temperature, ce_weight, kd_weight

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **batch):
        logits_s, logits_t, region_s, region_t = self.outputs(image, batch.get("teacher_logits"))
        if region_s is None:
            kd = kd_loss(logits_s, logits_t, self.temperature)
        else:
            kd = guarded(sdd_kd_loss, region_s, region_t, target, self.temperature)
        return logits_s, {"loss_ce": self.ce_weight * cross_entropy(logits_s, target),
                          "loss_kd": self.kd_weight * kd}


@register_distiller("SDD_DKD")
class SDD_DKD(_ScaleDecoupled):  # noqa: N801
    """SD-DKD: `DKD.CE_WEIGHT * CE + min(epoch / DKD.WARMUP, 1) * sdd_dkd_loss(ALPHA, BETA, T)`, guarded. M = [1]:
    mdistiller's DKD (times the warm-up)."""

    declares = _sdd_declaration(("DKD",))

    @classmethod
    def from_config(cls, cfg) -> dict:
        dkd = cfg.DKD
        return {"scales": method_scales(cfg.SDD.M), "ce_weight": dkd.CE_WEIGHT, "alpha": dkd.ALPHA, "beta": dkd.BETA,
                "temperature": dkd.T, "warmup": dkd.WARMUP}

    def setup(self, scales: Sequence[int] = (1, 2, 4), ce_weight: float = 1.0, alpha: float = 1.0, beta: float = 8.0,
              temperature: float = 4.0, warmup: float = 20) -> None:
        self.scales = method_scales(scales)
        self.ce_weight, self.alpha, self.beta = ce_weight, alpha, beta
        self.temperature, self.warmup = temperature, warmup

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, *, epoch: int, **batch):
        logits_s, logits_t, region_s, region_t = self.outputs(image, batch.get("teacher_logits"))
        if region_s is None:
            kd = dkd_loss(logits_s, logits_t, target, self.alpha, self.beta, self.temperature)
        else:
            kd = guarded(sdd_dkd_loss, region_s, region_t, target, self.alpha, self.beta, self.temperature)
        return logits_s, {"loss_ce": self.ce_weight * cross_entropy(logits_s, target),
                          "loss_kd": dkd_warmup(epoch, self.warmup) * kd}


@register_distiller("SDD_NKD")
class SDD_NKD(_ScaleDecoupled):  # noqa: N801
    """SD-NKD: `DKD.CE_WEIGHT * CE + min(epoch / DKD.WARMUP, 1) * sdd_nkd_loss(T = DKD.T, gamma = DKD.BETA)`, NKD with
    the label column kept, guarded. M = [1]: that NKD on the ordinary logits (batch mean, times the warm-up)."""

    declares = _sdd_declaration(("DKD",))

    @classmethod
    def from_config(cls, cfg) -> dict:
        dkd = cfg.DKD
        return {"scales": method_scales(cfg.SDD.M), "ce_weight": dkd.CE_WEIGHT, "temperature": dkd.T,
                "gamma": dkd.BETA, "warmup": dkd.WARMUP}

    def setup(self, scales: Sequence[int] = (1, 2, 4), ce_weight: float = 1.0, temperature: float = 4.0,
              gamma: float = 8.0, warmup: float = 20) -> None:
        self.scales = method_scales(scales)
        self.ce_weight, self.temperature, self.gamma, self.warmup = ce_weight, temperature, gamma, warmup

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, *, epoch: int, **batch):
        logits_s, logits_t, region_s, region_t = self.outputs(image, batch.get("teacher_logits"))
        if region_s is None:
            kd = nkd_keep_label_rows(logits_s, logits_t, target, self.temperature, self.gamma).mean()
        else:
            kd = guarded(sdd_nkd_loss, region_s, region_t, target, self.temperature, self.gamma)
        return logits_s, {"loss_ce": self.ce_weight * cross_entropy(logits_s, target),
                          "loss_kd": dkd_warmup(epoch, self.warmup) * kd}
