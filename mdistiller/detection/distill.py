"""The distillation terms of the detection recipes (detection.md 1.2-1.4), pure and not yet wired into a trainer.

- `dkd_roi_loss`: DKD (`mdistiller.distillers.dkd.dkd_loss`, unchanged) over the box head's (N, 81) class logits of
  the student's sampled proposals, student vs the teacher's logits on the same proposals; mean over the N proposals,
  background rows included, the assigned class (background included) as the target. The detector's logits and
  labels are background-first; they are mapped to detectron2's background-last order before the loss (DKD is
  invariant to a class permutation shared by logits and labels, so the value is the same either way; tested).
- `KDTrans`: the student-side ReviewKD transform on the FPN levels p2..p6 (5 attention-based fusions, 256 channels,
  deepest first, the residual resized to each level's own non-square (H, W)); upstream's state-dict names
  `kd_trans.abfs.{0..4}` with `abfs.0` = p6 (no fusion) and `abfs.4` = p2.
- `reviewkd_fpn_loss`: `weight * sum_levels HCL` with the classification `hcl_loss` (its pooled sizes 4, 2, 1 are
  used where smaller than the map's height, as upstream's detection code; adaptive pooling to l x l on non-square maps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdistiller.distillers.dkd import dkd_loss
from mdistiller.distillers.reviewkd import ABF, hcl_loss
from mdistiller.errors import MdistillerError

from .detector import NUM_CLASSES, logits_to_detectron2

FPN_CHANNELS = 256
FPN_LEVELS = 5  # p2..p6


def dkd_roi_loss(student_logits: Tensor, teacher_logits: Tensor, gt_classes: Tensor, alpha: float = 1.0,
                 beta: float = 0.25, temperature: float = 1.0, background_first: bool = True) -> Tensor:
    """`mean_N(alpha * TCKD + beta * NCKD)` over the sampled proposals' (N, 81) logits in detectron2's class order
    (fp32); logits and labels background-first (the detector's order) unless `background_first=False`."""
    if student_logits.dim() != 2 or student_logits.shape[1] < 2 or student_logits.shape != teacher_logits.shape:
        raise MdistillerError(f"dkd_roi_loss: student and teacher logits must both be (N, C >= 2; {NUM_CLASSES + 1} "
                              f"for COCO), got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if gt_classes.shape != student_logits.shape[:1]:
        raise MdistillerError(f"dkd_roi_loss: gt_classes must be ({student_logits.shape[0]},), "
                              f"got {tuple(gt_classes.shape)}")
    if background_first:
        student_logits, teacher_logits = logits_to_detectron2(student_logits), logits_to_detectron2(teacher_logits)
        # labels_to_detectron2 for C = 81, any C for the tests' toy logits
        gt_classes = torch.remainder(gt_classes - 1, student_logits.shape[1])
    # the teacher is a fixed target (frozen upstream); detached so no gradient can reach it
    return dkd_loss(student_logits, teacher_logits.detach(), gt_classes, alpha, beta, temperature)


class FPNABF(ABF):
    """The classification ABF's layers and init; fusion at this level's own (H, W), no resize to a teacher shape."""

    def __init__(self, channels: int = FPN_CHANNELS, fuse: bool = True):
        super().__init__(channels, channels, channels, fuse)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """(this level's output, the fused mid map passed to the next shallower level)."""
        x = self.conv1(x)
        if self.att_conv is not None:
            if residual is None:
                raise MdistillerError("kd_trans: a fusing level needs the deeper level's residual")
            residual = F.interpolate(residual, tuple(x.shape[-2:]), mode="nearest")
            attention = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * attention[:, 0:1] + residual * attention[:, 1:2]
        return self.conv2(x), x


class KDTrans(nn.Module):
    """ReviewKD's student transform of the FPN levels [p2..p6] -> 5 maps of the same shapes (upstream's `kd_trans`)."""

    def __init__(self, channels: int = FPN_CHANNELS, levels: int = FPN_LEVELS):
        super().__init__()
        self.abfs = nn.ModuleList([FPNABF(channels, fuse=i > 0) for i in range(levels)])  # abfs.0 = deepest

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """Maps of p2..p6 (shallow first) -> transformed maps in the same order."""
        if len(features) != len(self.abfs):
            raise MdistillerError(f"kd_trans: expected {len(self.abfs)} FPN levels (p2..p6), got {len(features)}")
        deepest_first = features[::-1]
        out, residual = self.abfs[0](deepest_first[0])
        outputs = [out]
        for feat, abf in zip(deepest_first[1:], self.abfs[1:]):
            out, residual = abf(feat, residual)
            outputs.insert(0, out)
        return outputs


def reviewkd_fpn_loss(student_maps: list[Tensor], teacher_maps: list[Tensor], weight: float) -> Tensor:
    """`weight * sum_levels HCL(kd_trans output, teacher FPN level)` (fp32)."""
    if len(student_maps) != len(teacher_maps) or not student_maps:
        raise MdistillerError(f"reviewkd_fpn_loss: need as many student as teacher levels (>= 1), got "
                              f"{len(student_maps)} and {len(teacher_maps)}")
    for i, (fs, ft) in enumerate(zip(student_maps, teacher_maps)):
        if fs.shape != ft.shape:
            raise MdistillerError(f"reviewkd_fpn_loss: level {i}: student {tuple(fs.shape)} vs teacher "
                                  f"{tuple(ft.shape)} (same image sizes give the same FPN shapes)")
    # the teacher's FPN maps are fixed targets (frozen upstream); detached so no gradient can reach them
    return weight * hcl_loss(student_maps, [ft.detach() for ft in teacher_maps])
