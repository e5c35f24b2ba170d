"""CAT-KD (Guo et al., CVPR 2023): class attention transfer (spec recent.md §7), pure functions.

CAMs are (B, C, H, W): the bias-free classifier as a 1x1 conv on the pre-pool map (GzyAftermath/CAT-KD
`mdistiller/distillers/CAT_KD.py`). The reference's order is binarise the teacher's CAMs, select partial CAMs, pool,
normalise; binarisation is per map and selection moves whole maps, so binarising inside `cat_loss` after the selection
gives the same maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import MdistillerError
from .precision import fp32_loss

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
