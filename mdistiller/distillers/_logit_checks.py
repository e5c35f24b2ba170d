"""Input checks and working precision shared by the pure logit losses of DIST, TTM/WTTM, NKD and RLD, and the
one-line refusal of logit standardisation for the methods whose authors never use it.

Each check raises a one-line `MdistillerError` naming the method, so a wrong call fails before any arithmetic.
"""

from __future__ import annotations

import math

import torch

from ..errors import MdistillerError


def working_precision(x: torch.Tensor) -> torch.Tensor:
    """`x` in fp32, or kept in fp64 (so that float64 gradient checks see double precision throughout)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def check_logit_pair(method: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    """Student and teacher logits must both be floating (B, C) tensors of one shape, with C >= 2."""
    for role, logits in (("student", student_logits), ("teacher", teacher_logits)):
        if logits.dim() != 2 or not logits.is_floating_point():
            raise MdistillerError(
                f"{method}: {role} logits must be a floating (B, C) tensor, got {logits.dtype} {tuple(logits.shape)}"
            )
    if student_logits.shape != teacher_logits.shape:
        raise MdistillerError(
            f"{method}: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    if student_logits.shape[1] < 2:
        raise MdistillerError(f"{method}: needs at least 2 classes, got {student_logits.shape[1]}")


def check_positive(method: str, **values: float) -> None:
    """Each named hyperparameter (a temperature, a power) must be a finite number > 0."""
    for name, value in values.items():
        if not (math.isfinite(value) and value > 0):
            raise MdistillerError(f"{method}: {name} must be a finite number > 0, got {value}")


def hard_labels(method: str, target: torch.Tensor, logits: torch.Tensor, soft_ok: bool) -> torch.Tensor:
    """(B,) class indices from a (B,) integer target, or (when `soft_ok`) the argmax of a (B, C) soft target."""
    batch, classes = logits.shape
    if target.dim() == 1 and not target.is_floating_point() and target.shape[0] == batch:
        return target.long()
    if soft_ok and target.dim() == 2 and target.is_floating_point() and tuple(target.shape) == (batch, classes):
        return target.argmax(dim=1)
    wanted = f"({batch},) integer labels" + (f" or ({batch}, {classes}) soft labels" if soft_ok else "")
    raise MdistillerError(f"{method}: target must be {wanted}, got {target.dtype} {tuple(target.shape)}")


def logit_stand_refusal(method: str) -> str:
    """The one line refusing `--logit-stand` (EXPERIMENT.LOGIT_STAND) for a method whose authors never use it."""
    return (f"{method} does not take logit standardisation (its authors never use it): leave out --logit-stand and "
            f"keep EXPERIMENT.LOGIT_STAND False")
