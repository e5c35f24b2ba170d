"""CAT-KD (Guo et al., CVPR 2023): class attention transfer (spec recent.md §7), `CAT_KD` (alias `CAT-KD`).

CAMs are (B, C, H, W): the bias-free classifier as a 1x1 conv on the pre-pool map (GzyAftermath/CAT-KD
`mdistiller/distillers/CAT_KD.py`). The reference's order is binarise the teacher's CAMs, select partial CAMs, pool,
normalise; binarisation is per map and selection moves whole maps, so binarising inside `cat_loss` after the selection
gives the same maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import MdistillerError
from ..models.common import class_activation_maps, drop_classifier_bias, prepool_map
from ._base import FEATURES, Declaration, Distiller, cross_entropy
from .config import Key, config_section
from .precision import fp32_loss
from .registry import register_distiller

NORMALIZE_EPS = 1e-12  # F.normalize's default, as the reference
STRATEGY_1_CLASSES = 100  # strategy 1 indexes the sorted logits at 99 - n whatever the class count (reference)


def _check_cams(cams: torch.Tensor, name: str) -> None:
    if cams.dim() != 4:
        raise MdistillerError(f"CAT-KD {name} CAMs must be (B, C, H, W), got shape {tuple(cams.shape)}")


def binarize_cams(cam_teacher: torch.Tensor) -> torch.Tensor:
    """1 where a CAM exceeds its own mean absolute value (per sample and class), else 0 (same dtype)."""
    _check_cams(cam_teacher, "teacher")
    threshold = cam_teacher.abs().mean(dim=(2, 3), keepdim=True)
    return (cam_teacher > threshold).to(cam_teacher.dtype)


@fp32_loss
def cat_loss(
    cam_student: torch.Tensor, cam_teacher: torch.Tensor, resolution: int, normalize: bool, binarize: bool = False
) -> torch.Tensor:
    """`mean((pool_r(CAM_s) - pool_r(CAM_t))^2)` over B*C*r*r, maps optionally L2-normalised (fp32)."""
    _check_cams(cam_student, "student")
    _check_cams(cam_teacher, "teacher")
    if cam_student.shape[:2] != cam_teacher.shape[:2]:
        raise MdistillerError(
            f"CAT-KD student and teacher CAMs differ in (B, C): {tuple(cam_student.shape[:2])} vs "
            f"{tuple(cam_teacher.shape[:2])}"
        )
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise MdistillerError(f"CAT-KD CAM_RESOLUTION must be a positive int, got {resolution!r}")
    teacher = cam_teacher.detach().float()
    if binarize:
        teacher = binarize_cams(teacher)
    student = F.adaptive_avg_pool2d(cam_student.float(), resolution)
    teacher = F.adaptive_avg_pool2d(teacher, resolution)
    if normalize:
        student = F.normalize(student, dim=(2, 3), eps=NORMALIZE_EPS)
        teacher = F.normalize(teacher, dim=(2, 3), eps=NORMALIZE_EPS)
    return F.mse_loss(student, teacher)


@torch.no_grad()
def partial_cam_mask(teacher_logits: torch.Tensor, n: int, strategy: int) -> torch.Tensor:
    """(B, C) bool: the classes whose CAMs the reference transfers under IF_OnlyTransferPartialCAMs.

    Strategy 0: teacher logit strictly above the row's n-th largest (n - 1 classes without ties). Strategy 1: the
    complement of "strictly above the (100 - n)-th largest" (n + 1 classes at C = 100; the 100 is hard-coded).
    The sorted position is indexed as Python does (a negative one counts from the end), as the reference.
    """
    if teacher_logits.dim() != 2:
        raise MdistillerError(f"CAT-KD teacher logits must be (B, C), got shape {tuple(teacher_logits.shape)}")
    if strategy not in (0, 1):
        raise MdistillerError(f"CAT-KD Strategy must be 0 or 1, got {strategy!r}")
    classes = teacher_logits.shape[1]
    position = n - 1 if strategy == 0 else STRATEGY_1_CLASSES - 1 - n
    if not -classes <= position < classes:
        raise MdistillerError(
            f"CAT-KD CAMs_Nums {n} with Strategy {strategy} indexes sorted position {position} of {classes} classes"
        )
    threshold = torch.sort(teacher_logits, dim=1, descending=True).values[:, position : position + 1 or None]
    above = teacher_logits > threshold
    return above if strategy == 0 else ~above


def select_partial_cams(cams: torch.Tensor, teacher_logits: torch.Tensor, n: int, strategy: int) -> torch.Tensor:
    """The kept CAMs of the whole batch packed into (B, kept / B, H, W); all CAMs when kept % B != 0 (reference)."""
    _check_cams(cams, "selected")
    mask = partial_cam_mask(teacher_logits, n, strategy)
    if mask.shape != cams.shape[:2]:
        raise MdistillerError(
            f"CAT-KD teacher logits {tuple(teacher_logits.shape)} do not match CAMs {tuple(cams.shape)}"
        )
    batch = cams.shape[0]
    # The reference decides on the host whether the kept count divides the batch: so does this (one sync).
    kept = int(mask.sum())
    if kept == 0:  # the reference fails here too (a view of 0 elements with a -1 size)
        raise MdistillerError(f"CAT-KD CAMs_Nums {n} with Strategy {strategy} kept no CAM in this batch")
    if kept % batch:
        return cams
    # Packing mixes samples whose kept counts differ: map k of row b is the (b * kept / B + k)-th kept map overall.
    return cams[mask].view(batch, kept // batch, *cams.shape[2:])


config_section("CAT_KD", {
    "LOSS": {
        "CE_WEIGHT": Key(1.0, "weight of the cross-entropy (loss_CE)"),
        "CAT_loss_weight": Key(400.0, "beta, the weight of the class-attention transfer (loss_CAT)"),
        "CAM_RESOLUTION": Key(2, "side r of the r x r maps the CAMs are average-pooled to"),
    },
    "IF_NORMALIZE": Key(True, "L2-normalise each pooled r x r map before the MSE"),
    "onlyCAT": Key(False, "True: no cross-entropy (the authors' CAT, loss_CAT alone)"),
    "IF_BINARIZE": Key(False, "teacher CAMs -> 1 above their mean absolute value, else 0"),
    "IF_OnlyTransferPartialCAMs": Key(False, "transfer only the CAMs of some classes (CAMs_Nums, Strategy)"),
    "CAMs_Nums": Key(100, "how many classes' CAMs (with IF_OnlyTransferPartialCAMs)"),
    "Strategy": Key(0, "0: the teacher's top classes; 1: its lowest (with the reference's hard-coded 100)", (0, 1)),
    "teacher_dir": Key(None, "the authors' custom-teacher path: refused, use DISTILLER.TEACHER_CKPT"),
    "student_dir": Key(None, "the authors' 'transfer' mode's student path: refused (not offered)"),
})
# The CAT-KD repo's top-level keys (its engine/cfg.py), honoured or refused by CAT_KD.from_config; validation refuses
# them away from their defaults for a method that does not read them.
config_section("if_test", Key(False, "CAT-KD: convert the models (classifier as a bias-free 1x1 conv on the pre-pool "
                                     "map, CAMs); CAT_KD needs True, as every published CAT-KD config sets"))
config_section("device", Key(0, "CAT-KD: the GPU index the authors' script writes into CUDA_VISIBLE_DEVICES on CIFAR "
                                "(0 accepted; another index is refused: set CUDA_VISIBLE_DEVICES yourself)"))
config_section("if_Augment", Key(False, "CAT-KD: read by nothing in the authors' code; accepted, no effect"))
config_section("if_useFactor", Key(False, "CAT-KD: read by nothing in the authors' code; accepted, no effect"))
config_section("if_self_train", Key(False, "CAT-KD: read by nothing in the authors' code; accepted, no effect"))

CAT_KD_SECTIONS = ("CAT_KD", "if_test", "device", "if_Augment", "if_useFactor", "if_self_train")
LOGIT_STAND_REFUSAL = ("--logit-stand: CAT-KD transfers class activation maps, not logits; logit standardisation is "
                       "refused for CAT_KD")


def _reads_features(hparams) -> dict[str, frozenset[str]]:
    return {"image": frozenset({FEATURES})}


@register_distiller("CAT_KD", ("CAT-KD", "the authors' ImageNet configs say CAT-KD"))
class CAT_KD(Distiller):  # noqa: N801 (the authors' DISTILLER.TYPE)
    """`CE_WEIGHT * CE + CAT_loss_weight * cat_loss(CAM_s, CAM_t)` (loss_CE, loss_CAT), as the authors' converted
    models compute it: CAMs are each model's classifier as a bias-free 1x1 conv on its pre-pool map (the teacher's
    under no_grad; its classifier bias is never used), and the student trains without a classifier bias
    (`drop_classifier_bias` in setup: not a parameter, not in its state dict; its logits are then the spatial mean of
    its CAMs, as the authors' `*_test` students). The partial-CAM selection ranks classes by the teacher's bias-free
    logits, the spatial mean of its CAMs.

    The authors' top-level keys: `if_test` must be True (False would train their loss on unconverted feature maps);
    `device` is a CIFAR placement choice, accepted as 0 and refused otherwise (set CUDA_VISIBLE_DEVICES instead);
    `if_Augment`, `if_useFactor`, `if_self_train` do nothing in the authors' code and nothing here. `teacher_dir` and
    `student_dir` are refused (DISTILLER.TEACHER_CKPT names a teacher file).
    """

    declares = Declaration(
        loss_terms=("loss_CE", "loss_CAT"),
        distillation_terms=("loss_CAT",),
        config_sections=CAT_KD_SECTIONS,
        teacher_reads=_reads_features,
        logit_stand_refusal=LOGIT_STAND_REFUSAL,
    )

    @classmethod
    def from_config(cls, cfg) -> dict:
        if not cfg.if_test:
            raise MdistillerError("CAT_KD needs if_test True (the authors' model conversion, which every CAT-KD config "
                                  "sets): if_test False would train their loss on unconverted feature maps")
        if cfg.device != 0 and cfg.DATASET.TYPE != "imagenet":
            raise MdistillerError(f"device {cfg.device}: the CAT-KD script's GPU choice is not taken from the config "
                                  f"here; run with CUDA_VISIBLE_DEVICES={cfg.device} and leave device at 0")
        cat = cfg.CAT_KD
        if cat.teacher_dir is not None:
            raise MdistillerError(f"CAT_KD.teacher_dir {cat.teacher_dir!r}: name the teacher file with "
                                  f"DISTILLER.TEACHER_CKPT instead")
        if cat.student_dir is not None:
            raise MdistillerError(f"CAT_KD.student_dir {cat.student_dir!r} belongs to the CAT-KD repo's 'transfer' "
                                  f"mode, which is not offered")
        return {"ce_weight": cat.LOSS.CE_WEIGHT, "cat_weight": cat.LOSS.CAT_loss_weight,
                "resolution": cat.LOSS.CAM_RESOLUTION, "normalize": bool(cat.IF_NORMALIZE),
                "only_cat": bool(cat.onlyCAT), "binarize": bool(cat.IF_BINARIZE),
                "partial": bool(cat.IF_OnlyTransferPartialCAMs), "cams_nums": cat.CAMs_Nums, "strategy": cat.Strategy}

    def setup(self, ce_weight: float = 1.0, cat_weight: float = 400.0, resolution: int = 2, normalize: bool = True,
              only_cat: bool = False, binarize: bool = False, partial: bool = False, cams_nums: int = 100,
              strategy: int = 0) -> None:
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise MdistillerError(f"CAT_KD.LOSS.CAM_RESOLUTION must be a positive int, got {resolution!r}")
        if strategy not in (0, 1):
            raise MdistillerError(f"CAT_KD.Strategy must be 0 or 1, got {strategy!r}")
        self.ce_weight, self.cat_weight, self.resolution = ce_weight, cat_weight, resolution
        self.normalize, self.only_cat, self.binarize = normalize, only_cat, binarize
        self.partial, self.cams_nums, self.strategy = partial, cams_nums, strategy
        drop_classifier_bias(self.student)

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **batch):
        logits_student, feats_student = self.student(image)
        _, feats_teacher = self.teacher_forward(image)
        cam_student = class_activation_maps(self.student, prepool_map(feats_student, "the student"))
        with torch.no_grad():
            cam_teacher = class_activation_maps(self.teacher, prepool_map(feats_teacher, "the teacher"))
        if self.partial:
            teacher_logits = cam_teacher.mean(dim=(2, 3))  # the converted teacher's logits: no bias
            cam_student = select_partial_cams(cam_student, teacher_logits, self.cams_nums, self.strategy)
            cam_teacher = select_partial_cams(cam_teacher, teacher_logits, self.cams_nums, self.strategy)
        losses = {"loss_CAT": self.cat_weight * cat_loss(cam_student, cam_teacher, self.resolution, self.normalize,
                                                          self.binarize)}
        if not self.only_cat:
            losses["loss_CE"] = self.ce_weight * cross_entropy(logits_student, target)
        return logits_student, losses
