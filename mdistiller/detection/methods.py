"""The detection distillers (DISTILLER.TYPE RCNN_NONE, RCNN_DKD, RCNN_REVIEWKD, RCNN_REVIEWDKD): upstream's RCNNKD
with KD.TYPE NONE / DKD / ReviewKD / ReviewDKD (detection.md 1.1-1.5) on the detectors of `detector.py`.

A training batch is the COCO loaders': `images` (RGB uint8 (3, H, W), resized and flipped by the pipeline) and
`targets` (labels 0..79). The student gets its own input (`model_inputs`), the labels background-first (1..80), and
returns upstream's losses. The teacher (frozen, eval mode, no_grad) sees the same images padded alike, so both FPNs
have the same shapes and the student's sampled proposals are in the teacher's coordinates too:
- RCNN_DKD: `loss_dkd` = DKD of the student's box-head logits on its sampled proposals vs the teacher's box head on
  the same proposals over the teacher's p2..p5 (`dkd_roi_loss`; no warm-up, no extra weight);
- RCNN_REVIEWKD: `loss_reviewkd` = LOSS_WEIGHT x sum over p2..p6 of HCL(kd_trans(student FPN), teacher FPN);
- RCNN_REVIEWDKD: both, on one teacher forward.
Teacher input, upstream's quirk by default (1.5): `(image - teacher mean) / teacher std` in the STUDENT's channel
order, then reversed when the formats differ (an RGB R18 student: the teacher sees R and B means swapped);
DETECTION.TEACHER_FLIP_BEFORE_NORMALIZE True gives the teacher its own format first (as it was trained).
In eval mode the distiller is the plain student: detections per image (boxes in the resized image, scores,
background-first labels 1..80).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..distillers import Declaration, Distiller, Key, config_section, register_distiller
from ..errors import MdistillerError

# The detector and the distillation terms (torchvision's detection modules) are imported where used: importing this
# module registers the methods and their config sections without them, so the config can be assembled cheaply.

TASK_LOSSES = ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg")

config_section("RCNN_DKD", {
    "ALPHA": Key(1.0, "weight of TCKD on the sampled proposals' box-head logits (upstream's KD.DKD.ALPHA)"),
    "BETA": Key(0.25, "weight of NCKD (upstream's KD.DKD.BETA)"),
    "T": Key(1.0, "temperature of both terms, each scaled by T^2 (upstream's KD.DKD.T)"),
})
config_section("RCNN_REVIEWKD", {
    "LOSS_WEIGHT": Key(1.0, "weight of the summed HCL over p2..p6 (upstream's REVIEWKD.LOSS_WEIGHT)"),
})


def teacher_inputs(teacher, images: list[Tensor], student_format: str, flip_before_normalize: bool = False):
    """The pipeline's RGB images as the teacher's input, padded as the student's (same image sizes). Formats that
    differ: upstream normalises with the teacher's mean/std in `student_format`'s channel order, then reverses the
    channels; `flip_before_normalize` reverses first (the teacher's own format, then its mean/std). An ImageList."""
    from torchvision.models.detection.image_list import ImageList

    from .detector import model_inputs, to_image_list

    if student_format not in ("RGB", "BGR"):
        raise MdistillerError(f"detector: input_format must be RGB or BGR, got {student_format!r}")
    if flip_before_normalize or student_format == teacher.input_format:
        return model_inputs(teacher, images)
    in_student_order = images if student_format == "RGB" else [im.flip(0) for im in images]
    batch = to_image_list(in_student_order, teacher.pixel_mean, teacher.pixel_std)
    return ImageList(batch.tensors.flip(1), batch.image_sizes)


def detector_targets(targets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """The loaders' targets (labels 0..79) with the detector's background-first labels 1..80 (copies)."""
    return [{**t, "labels": t["labels"] + 1} for t in targets]


def _check_weight(key: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise MdistillerError(f"{key} {value} must be a finite number >= 0")
    return value


def _check_temperature(key: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise MdistillerError(f"{key} {value} must be a finite number > 0")
    return value


def _dkd_hparams(cfg) -> dict[str, float]:
    return {"alpha": _check_weight("RCNN_DKD.ALPHA", cfg.RCNN_DKD.ALPHA),
            "beta": _check_weight("RCNN_DKD.BETA", cfg.RCNN_DKD.BETA),
            "temperature": _check_temperature("RCNN_DKD.T", cfg.RCNN_DKD.T)}


def _reviewkd_hparams(cfg) -> dict[str, float]:
    return {"loss_weight": _check_weight("RCNN_REVIEWKD.LOSS_WEIGHT", cfg.RCNN_REVIEWKD.LOSS_WEIGHT)}


def _declaration(distillation_terms: tuple[str, ...], config_sections: tuple[str, ...] = (),
                 extra_modules: tuple[str, ...] = ()) -> Declaration:
    return Declaration(task="detection", loss_terms=TASK_LOSSES + distillation_terms,
                       distillation_terms=distillation_terms, config_sections=config_sections,
                       requires_teacher=bool(distillation_terms), extra_modules=extra_modules)


class RCNNDistiller(Distiller):
    """Upstream's RCNNKD: the student's Faster R-CNN losses, plus the distillation terms a subclass switches on."""

    declares: ClassVar[Declaration]
    uses_dkd: ClassVar[bool] = False
    uses_reviewkd: ClassVar[bool] = False

    @classmethod
    def from_config(cls, cfg) -> dict[str, Any]:
        hparams: dict[str, Any] = {}
        if cls.declares.requires_teacher:
            hparams["teacher_flip_before_normalize"] = bool(cfg.DETECTION.TEACHER_FLIP_BEFORE_NORMALIZE)
        if cls.uses_dkd:
            hparams.update(_dkd_hparams(cfg))
        if cls.uses_reviewkd:
            hparams.update(_reviewkd_hparams(cfg))
        return hparams

    def configure(self, alpha: float = 1.0, beta: float = 0.25, temperature: float = 1.0, loss_weight: float = 1.0,
                  teacher_flip_before_normalize: bool = False) -> None:
        """Check the models and keep the hyperparameters (each subclass's `setup` passes the ones it reads)."""
        from .detector import Detector
        from .distill import KDTrans

        if not isinstance(self.student, Detector):
            raise MdistillerError(f"{type(self).__name__} trains a detection student, got a "
                                  f"{type(self.student).__name__}")
        if self.teacher is not None and not isinstance(self.teacher, Detector):
            raise MdistillerError(f"{type(self).__name__} distils from a detection teacher, got a "
                                  f"{type(self.teacher).__name__}")
        self.alpha = _check_weight("RCNN_DKD.ALPHA", alpha)
        self.beta = _check_weight("RCNN_DKD.BETA", beta)
        self.temperature = _check_temperature("RCNN_DKD.T", temperature)
        self.loss_weight = _check_weight("RCNN_REVIEWKD.LOSS_WEIGHT", loss_weight)
        self.teacher_flip_before_normalize = bool(teacher_flip_before_normalize)
        if self.uses_reviewkd:
            self.kd_trans = KDTrans()

    def get_extra_parameters(self) -> int:
        """Parameters trained beside the student (`kd_trans`); the base's count would subtract the student's frozen
        stem and res2, which the optimizer never sees."""
        return sum(p.numel() for _, module in self.named_extra_modules() for p in module.parameters())

    def forward_train(self, images: list[Tensor], targets: list[dict[str, Tensor]], epoch: Any = None,
                      **batch: Any) -> tuple[None, dict[str, Tensor]]:
        """(None, {loss name: scalar}) with exactly the declared loss names (no warm-up: `epoch` is unused)."""
        from .detector import FEATURE_NAMES, fpn_features, model_inputs, roi_logits
        from .distill import dkd_roi_loss, reviewkd_fpn_loss

        student_in = model_inputs(self.student, images)
        out = self.student.train_forward(student_in, detector_targets(targets))
        losses = dict(out.losses)
        if self.teacher is None:
            return None, losses
        teacher_in = teacher_inputs(self.teacher, images, self.student.input_format,
                                    self.teacher_flip_before_normalize)
        # no_grad, not inference_mode: HCL saves the teacher maps for its backward
        with torch.no_grad():
            teacher_features = fpn_features(self.teacher, teacher_in)
            if self.uses_dkd:
                teacher_logits = roi_logits(self.teacher, teacher_features, out.sample.proposals,
                                            student_in.image_sizes)
        if self.uses_dkd:
            losses["loss_dkd"] = dkd_roi_loss(out.sample.class_logits, teacher_logits, out.sample.labels,
                                              self.alpha, self.beta, self.temperature)
        if self.uses_reviewkd:
            student_maps = self.kd_trans([out.features[name] for name in FEATURE_NAMES])
            losses["loss_reviewkd"] = reviewkd_fpn_loss(
                student_maps, [teacher_features[name] for name in FEATURE_NAMES], self.loss_weight)
        return None, losses

    def forward_test(self, images: list[Tensor]) -> list[dict[str, Tensor]]:  # type: ignore[override]
        """The student's detections per image: boxes (resized image), scores, labels (background-first 1..80)."""
        from .detector import model_inputs

        return self.student(model_inputs(self.student, images))

    def forward(self, **batch: Any):
        if self.training:
            return self.forward_train(**batch)
        return self.forward_test(batch["images"])


@register_distiller("RCNN_NONE")
class RCNNNone(RCNNDistiller):
    """The student alone (upstream's KD.TYPE NONE): loss_rpn_cls, loss_rpn_loc, loss_cls, loss_box_reg."""

    declares = _declaration(())

    def setup(self) -> None:
        self.configure()


@register_distiller("RCNN_DKD")
class RCNNDKD(RCNNDistiller):
    """+ loss_dkd on the student's sampled proposals (upstream's KD.TYPE DKD)."""

    declares = _declaration(("loss_dkd",), ("RCNN_DKD",))
    uses_dkd = True

    def setup(self, alpha: float, beta: float, temperature: float, teacher_flip_before_normalize: bool = False
              ) -> None:
        self.configure(alpha=alpha, beta=beta, temperature=temperature,
                       teacher_flip_before_normalize=teacher_flip_before_normalize)


@register_distiller("RCNN_REVIEWKD")
class RCNNReviewKD(RCNNDistiller):
    """+ loss_reviewkd on the FPN levels through `kd_trans` (upstream's KD.TYPE ReviewKD)."""

    declares = _declaration(("loss_reviewkd",), ("RCNN_REVIEWKD",), ("kd_trans",))
    uses_reviewkd = True

    def setup(self, loss_weight: float, teacher_flip_before_normalize: bool = False) -> None:
        self.configure(loss_weight=loss_weight, teacher_flip_before_normalize=teacher_flip_before_normalize)


@register_distiller("RCNN_REVIEWDKD")
class RCNNReviewDKD(RCNNDistiller):
    """+ loss_dkd and loss_reviewkd on one teacher forward (upstream's KD.TYPE ReviewDKD)."""

    declares = _declaration(("loss_dkd", "loss_reviewkd"), ("RCNN_DKD", "RCNN_REVIEWKD"), ("kd_trans",))
    uses_dkd = True
    uses_reviewkd = True

    def setup(self, alpha: float, beta: float, temperature: float, loss_weight: float,
              teacher_flip_before_normalize: bool = False) -> None:
        self.configure(alpha=alpha, beta=beta, temperature=temperature, loss_weight=loss_weight,
                       teacher_flip_before_normalize=teacher_flip_before_normalize)
