"""KD++ / DKD++ (Wang et al., arXiv 2305.17007): the norm-and-direction (ND) loss, class centres, the projector.

Spec recent.md §8; reference WangYZ1608/Knowledge-Distillation-via-ND (`CIFAR/utils.py` DirectNormLoss, the loops
`CIFAR/train_cifar_{kd,dkd}.py`, `CIFAR/emb_fea_distribution.py`, `CIFAR/Models/embtrans_cifar.py`,
`ImageNet/Models/embtrans.py`). The KD / DKD parts are `kd.kd_loss` and `dkd.dkd_loss` (the same formulas).
"""

from __future__ import annotations

import json
import math
from typing import Iterable

import torch
import torch.nn as nn

from ..errors import MdistillerError
from ..files import atomic_write_text
from .precision import fp32_loss

CENTRE_DECIMALS = 4  # the authors round each per-sample value, then each class mean, to 4 decimals
_SCALE = 10**CENTRE_DECIMALS
PROJECTOR_INITS = ("cifar", "imagenet")
PROJECTOR_DROPOUT = 0.5
IMAGENET_INIT_STD = 0.01


@fp32_loss
def nd_loss(
    student_emb: torch.Tensor, teacher_emb: torch.Tensor, centres: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """`mean_b [1 - <s_b, c_y / |c_y|> / max(|s_b|, |t_b|)]`, the ND loss; gradient to s only (fp32)."""
    if student_emb.dim() != 2 or student_emb.shape != teacher_emb.shape:
        raise MdistillerError(
            f"ND needs student and teacher embeddings of one shape (B, D), got {tuple(student_emb.shape)} and "
            f"{tuple(teacher_emb.shape)} (a projector maps the student's size to the teacher's)"
        )
    if centres.dim() != 2 or centres.shape[1] != student_emb.shape[1]:
        raise MdistillerError(
            f"ND centres must be (num_classes, {student_emb.shape[1]}), got shape {tuple(centres.shape)}"
        )
    s = student_emb.float()
    t = teacher_emb.detach().float()
    centre = centres.detach().float()[target]
    direction = centre / centre.norm(dim=1, keepdim=True)
    s_norm, t_norm = s.norm(dim=1), t.norm(dim=1)
    # Python's max(|s|, |t|) in the reference returns |s| on a tie: the gradient then goes through |s|.
    max_norm = torch.where(s_norm >= t_norm, s_norm, t_norm)
    return (1.0 - (s * direction).sum(1) / max_norm).mean()


def kdpp_warmup(epoch: float, warmup: float) -> float:
    """KD++'s warm-up factor `min(1, e0 / WARMUP)` with the authors' 0-based e0 = epoch - 1 (our epochs are 1-based)."""
    if warmup <= 0:
        return 1.0
    return min(1.0, (float(epoch) - 1.0) / float(warmup))


def _round_half_even_div(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """Exact integer `round(numerator / denominator)`, ties to even (int64)."""
    quotient = torch.div(numerator, denominator, rounding_mode="floor")
    twice_rest = 2 * (numerator - quotient * denominator)
    up = (twice_rest > denominator) | ((twice_rest == denominator) & (quotient % 2 == 1))
    return quotient + up.long()


def class_centres(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | tuple[torch.Tensor, torch.Tensor], num_classes: int
) -> torch.Tensor:
    """Per-class mean embedding with the authors' rounding (4 decimals per value, then per mean); (C, D) float64.

    `batches`: an iterable of (embeddings (B, D), labels (B,)) pairs, or one such pair. Each value is rounded as
    Python's `round(v, 4)` (exact for fp32/bf16/fp16 values: `v * 1e4` is exact in float64) and kept as an integer
    count of 1e-4, so the sums are exact and memory is O(C * D). The class mean is rounded half to even; the authors'
    numpy mean may round an exact half-way mean (a sum that is an odd multiple of n / 2 in 1e-4 units) either way.
    """
    if isinstance(batches, tuple) and len(batches) == 2 and torch.is_tensor(batches[0]):
        batches = [batches]
    sums: torch.Tensor | None = None
    counts = torch.zeros(num_classes, dtype=torch.long)
    for embeddings, labels in batches:
        if embeddings.dim() != 2 or labels.shape != (embeddings.shape[0],):
            raise MdistillerError(
                f"class centres need embeddings (B, D) and labels (B,), got {tuple(embeddings.shape)} and "
                f"{tuple(labels.shape)}"
            )
        labels = labels.detach().cpu().long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise MdistillerError(f"class centres: a label outside [0, {num_classes}) in {labels.tolist()}")
        units = torch.round(embeddings.detach().cpu().double() * _SCALE).long()
        if sums is None:
            sums = torch.zeros(num_classes, embeddings.shape[1], dtype=torch.long)
        elif units.shape[1] != sums.shape[1]:
            raise MdistillerError(f"class centres: embeddings of size {units.shape[1]} after size {sums.shape[1]}")
        sums.index_add_(0, labels, units)
        counts += torch.bincount(labels, minlength=num_classes)
    if sums is None:
        raise MdistillerError("class centres: no embeddings were given")
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        raise MdistillerError(f"class centres: no sample of class(es) {missing[:10]} (of {num_classes})")
    return _round_half_even_div(sums, counts[:, None]).double() / _SCALE


def save_centres(path: str, centres: torch.Tensor) -> None:
    """Write (C, D) centres as the authors' JSON `{"0": [D floats], "1": ...}` (indent 4), atomically."""
    if centres.dim() != 2:
        raise MdistillerError(f"class centres must be (C, D), got shape {tuple(centres.shape)}")
    rows = centres.detach().cpu().double().tolist()
    atomic_write_text(path, json.dumps({str(k): row for k, row in enumerate(rows)}, indent=4))


def load_centres(path: str, num_classes: int, dim: int) -> torch.Tensor:
    """Read the authors' centre JSON as a (num_classes, dim) fp32 tensor; refuse another class count or dimension."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise MdistillerError(f"cannot read class-centre file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise MdistillerError(f"class-centre file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MdistillerError(f"class-centre file {path} must hold a JSON object {{\"0\": [...], ...}}")
    if len(data) != num_classes:
        raise MdistillerError(f"class-centre file {path} has {len(data)} classes, the teacher has {num_classes}")
    expected = {str(k) for k in range(num_classes)}
    if set(data) != expected:
        odd = sorted(set(data) - expected)[:5]
        raise MdistillerError(f"class-centre file {path}: keys must be \"0\"..\"{num_classes - 1}\", found {odd}")
    rows = []
    for k in range(num_classes):
        row = data[str(k)]
        if not isinstance(row, list) or len(row) != dim:
            size = len(row) if isinstance(row, list) else type(row).__name__
            raise MdistillerError(
                f"class-centre file {path}: class {k} has a centre of size {size}, the teacher's embedding has {dim}"
            )
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in row):
            raise MdistillerError(f"class-centre file {path}: class {k} holds a non-numeric or non-finite value")
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float32)


def make_projector(d_student: int, d_teacher: int, init: str = "cifar") -> nn.Sequential:
    """The authors' projector BatchNorm1d(D_s) -> Dropout(0.5) -> Linear(D_s, D_t), CIFAR or ImageNet init."""
    if init not in PROJECTOR_INITS:
        raise MdistillerError(f"projector init must be one of {list(PROJECTOR_INITS)}, got {init!r}")
    projector = nn.Sequential(
        nn.BatchNorm1d(d_student), nn.Dropout(PROJECTOR_DROPOUT), nn.Linear(d_student, d_teacher)
    )
    bn, linear = projector[0], projector[2]
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    if init == "cifar":  # Linear weight: PyTorch's default
        nn.init.zeros_(linear.bias)
    else:
        nn.init.normal_(linear.weight, mean=0.0, std=IMAGENET_INIT_STD)
        nn.init.normal_(linear.bias, mean=0.0, std=IMAGENET_INIT_STD)
    return projector
