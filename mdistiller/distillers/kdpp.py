"""KD++ / DKD++ (Wang et al., arXiv 2305.17007): KD or DKD plus the norm-and-direction loss ND: `KDPP`, `DKDPP` (ours).

Spec recent.md §8; reference WangYZ1608/Knowledge-Distillation-via-ND (`CIFAR/utils.py` DirectNormLoss, the loops
`CIFAR/train_cifar_{kd,dkd}.py`, `ImageNet/train_{kd,dkd}.py`, `CIFAR/emb_fea_distribution.py`,
`CIFAR/Models/embtrans_cifar.py`, `ImageNet/Models/embtrans.py`). The KD / DKD parts are `kd.kd_loss` and
`dkd.dkd_loss` (the same formulas).

KD++: `CE_WEIGHT * CE + min(1, e0 / WARMUP) * KD_WEIGHT * T^2 KL(T) + ND_WEIGHT * ND`; DKD++ the same with
mdistiller's DKD (`ALPHA * TCKD + BETA * NCKD`, each T^2) for the KL. e0 is the authors' 0-based epoch, our epoch - 1:
the first epoch has no KD term. DKDPP.ND_WARMUP True multiplies ND by the warm-up too (the authors' ImageNet
`train_dkd.py`; their CIFAR loops and both KD++ loops do not).

The class centres (the teacher's mean pooled feature per class over the training set, with its training augmentation)
come from `<KDPP|DKDPP>.CENTERS`, a JSON file in the authors' layout written by `tools/kdpp_centers.py`. They are kept
as the buffer `class_centres`, in checkpoints, so a resumed run uses the centres it started with. The student's pooled
feature goes through `projector` (BatchNorm1d -> Dropout(0.5) -> Linear) when its size differs from the teacher's (the
authors enable it by student name, for exactly the pairs whose sizes differ).

Quirk reproduced (REINIT_STUDENT True, the default): the authors' wrapper that adds the projector runs its init loop
over every module it holds, the student included, so with a projector the student's nn.Linear layers are
re-initialised the projector's way (CIFAR: biases zeroed; ImageNet: weights and biases from N(0, 0.01)) and any
BatchNorm1d set to 1 / 0. REINIT_STUDENT False leaves the student as the zoo built it. Without a projector the authors
do not wrap the student: nothing is re-initialised. Not reproduced: the authors' loops load resnet56's (CIFAR) or
resnet50's (ImageNet) centre file whatever the teacher (edited by hand per run); here the file must match the teacher's
class count and feature size.
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterable

import torch
import torch.nn as nn

from ..errors import MdistillerError
from ..files import atomic_write_text, resolve_project_path
from ..models.common import classifier_weights, num_classes_of_model
from ._base import Declaration, Distiller, cross_entropy
from .config import Key, config_section
from .dkd import dkd_loss
from .kd import kd_loss
from .precision import fp32_loss
from .registry import register_distiller
from .tool_hints import teacher_tool_command

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


def authors_init_(module: nn.Module, init: str) -> None:
    """The authors' wrapper init over every BatchNorm1d (weight 1, bias 0) and nn.Linear of `module`: CIFAR zeroes
    the Linear biases (weights keep PyTorch's default), ImageNet draws weights and biases from N(0, 0.01)."""
    if init not in PROJECTOR_INITS:
        raise MdistillerError(f"projector init must be one of {list(PROJECTOR_INITS)}, got {init!r}")
    for m in module.modules():
        if isinstance(m, nn.BatchNorm1d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and init == "cifar":
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=IMAGENET_INIT_STD)
            nn.init.normal_(m.bias, mean=0.0, std=IMAGENET_INIT_STD)


def make_projector(d_student: int, d_teacher: int, init: str = "cifar") -> nn.Sequential:
    """The authors' projector BatchNorm1d(D_s) -> Dropout(0.5) -> Linear(D_s, D_t), CIFAR or ImageNet init."""
    if init not in PROJECTOR_INITS:
        raise MdistillerError(f"projector init must be one of {list(PROJECTOR_INITS)}, got {init!r}")
    projector = nn.Sequential(
        nn.BatchNorm1d(d_student), nn.Dropout(PROJECTOR_DROPOUT), nn.Linear(d_student, d_teacher)
    )
    authors_init_(projector, init)
    return projector


def centres_command(cfg, out: str) -> str:
    """The tools/kdpp_centers.py command line that writes `out` for this config's teacher and data."""
    return teacher_tool_command("kdpp_centers.py", cfg, out)


def default_centres_path(dataset_type: str, teacher: str) -> str:
    """Where the tool writes a teacher's centres by default (the authors' file name, under kdpp_centers/)."""
    return os.path.join("kdpp_centers", dataset_type, teacher, "center_emb_train.json")


def embedding_size(model: nn.Module) -> int:
    """The size of a model's pooled feature (feats["pooled_feat"]): its classifier's input size."""
    return int(classifier_weights(model)[0].shape[1])


_COMMON_KEYS = {
    "CE_WEIGHT": Key(1.0, "weight of the cross-entropy with the labels"),
    "T": Key(4.0, "temperature of the KD / DKD term (scaled by T^2); the authors' ImageNet runs 1.0"),
    "ND_WEIGHT": Key(1.0, "weight of the ND (norm and direction) loss"),
    "WARMUP": Key(20.0, "warm-up min(1, (epoch - 1) / WARMUP) of the KD / DKD term (0-based epochs, the authors'); "
                        "ImageNet 5"),
    "CENTERS": Key("", "the teacher's class-centre JSON (authors' layout), made by tools/kdpp_centers.py"),
    "PROJECTOR_INIT": Key("auto", "projector init: cifar (BN 1/0, Linear bias 0) or imagenet (Linear N(0, 0.01)); "
                                  "auto: imagenet on DATASET.TYPE imagenet, else cifar", ("auto", "cifar", "imagenet")),
    "REINIT_STUDENT": Key(True, "with a projector, re-initialise the student's Linear layers as the authors' "
                                "wrapper does (False: the zoo's init)"),
}

config_section("KDPP", {
    "CE_WEIGHT": _COMMON_KEYS["CE_WEIGHT"],
    "KD_WEIGHT": Key(1.0, "weight of the KD term"),
    **{k: v for k, v in _COMMON_KEYS.items() if k != "CE_WEIGHT"},
})
config_section("DKDPP", {
    "CE_WEIGHT": _COMMON_KEYS["CE_WEIGHT"],
    "ALPHA": Key(1.0, "weight of DKD's target-class term TCKD"),
    "BETA": Key(1.0, "weight of DKD's non-target-class term NCKD"),
    **{k: v for k, v in _COMMON_KEYS.items() if k != "CE_WEIGHT"},
    "ND_WARMUP": Key(False, "multiply ND by the warm-up too (the authors' ImageNet DKD++ loop; CIFAR does not)"),
})


def _projector_init(init: str, dataset_type: str) -> str:
    if init == "auto":
        return "imagenet" if dataset_type == "imagenet" else "cifar"
    return init


def _centres_path(section: str, cfg) -> str:
    """`<section>.CENTERS`, refused in one line when empty or missing, with the command that makes the file."""
    path = cfg[section].CENTERS
    if not path:
        out = default_centres_path(cfg.DATASET.TYPE, cfg.DISTILLER.TEACHER)
        raise MdistillerError(
            f"{section}.CENTERS is empty: {section} needs the teacher's class centres. Make them with "
            f"{centres_command(cfg, out)} and set {section}.CENTERS {out}"
        )
    if not os.path.isfile(resolve_project_path(path)):
        raise MdistillerError(
            f"{section}.CENTERS {path}: no such file. Make it with {centres_command(cfg, path)}"
        )
    return path


LOGIT_STAND_REFUSAL = ("--logit-stand: the KD++ / DKD++ authors never standardise logits; logit standardisation is "
                       "refused for KDPP and DKDPP")


class _NormDirection(Distiller):
    """What KD++ and DKD++ share: the centres, the projector, the embeddings and the ND term."""

    def _setup_nd(self, nd_weight: float, warmup: float, centers: str, projector_init: str,
                  reinit_student: bool) -> None:
        self.nd_weight, self.warmup = nd_weight, warmup
        d_student, d_teacher = embedding_size(self.student), embedding_size(self.teacher)
        centres = load_centres(resolve_project_path(centers), num_classes_of_model(self.teacher), d_teacher)
        self.register_buffer("class_centres", centres)
        if d_student != d_teacher:
            self.projector = make_projector(d_student, d_teacher, projector_init)
            if reinit_student:
                authors_init_(self.student, projector_init)
        else:
            self.projector = None

    def embeddings_and_logits(self, image: torch.Tensor):
        """(student logits, teacher logits, student embedding (projected), teacher embedding)."""
        logits_student, feats_student = self.student(image)
        logits_teacher, feats_teacher = self.teacher_forward(image)
        student_emb = feats_student["pooled_feat"]
        if self.projector is not None:
            student_emb = self.projector(student_emb)
        return logits_student, logits_teacher, student_emb, feats_teacher["pooled_feat"]

    def nd(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """ND_WEIGHT * ND against this run's class centres."""
        return self.nd_weight * nd_loss(student_emb, teacher_emb, self.class_centres, target)


def _nd_declaration(section: str) -> Declaration:
    """KD++ / DKD++: CE, the KD or DKD term and ND; teacher logits and pooled features (the default reads)."""
    return Declaration(
        loss_terms=("loss_ce", "loss_kd", "loss_nd"),
        distillation_terms=("loss_kd", "loss_nd"),
        config_sections=(section,),
        extra_modules=("projector",),
        logit_stand_refusal=LOGIT_STAND_REFUSAL,
        rank_synced_buffers=("class_centres",),  # read from one file on every rank, never changed
    )


@register_distiller("KDPP")
class KDPP(_NormDirection):
    """KD++: `CE_WEIGHT * CE + min(1, (epoch - 1) / WARMUP) * KD_WEIGHT * kd_loss(T) + ND_WEIGHT * ND`."""

    declares = _nd_declaration("KDPP")

    @classmethod
    def from_config(cls, cfg) -> dict:
        kdpp = cfg.KDPP
        return {"ce_weight": kdpp.CE_WEIGHT, "kd_weight": kdpp.KD_WEIGHT, "temperature": kdpp.T,
                "nd_weight": kdpp.ND_WEIGHT, "warmup": kdpp.WARMUP, "centers": _centres_path("KDPP", cfg),
                "projector_init": _projector_init(kdpp.PROJECTOR_INIT, cfg.DATASET.TYPE),
                "reinit_student": bool(kdpp.REINIT_STUDENT)}

    def setup(self, centers: str, ce_weight: float = 1.0, kd_weight: float = 1.0, temperature: float = 4.0,
              nd_weight: float = 1.0, warmup: float = 20.0, projector_init: str = "cifar",
              reinit_student: bool = True) -> None:
        self.ce_weight, self.kd_weight, self.temperature = ce_weight, kd_weight, temperature
        self._setup_nd(nd_weight, warmup, centers, projector_init, reinit_student)

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, *, epoch: int, **batch):
        logits_student, logits_teacher, student_emb, teacher_emb = self.embeddings_and_logits(image)
        losses = {
            "loss_ce": self.ce_weight * cross_entropy(logits_student, target),
            "loss_kd": kdpp_warmup(epoch, self.warmup) * self.kd_weight
            * kd_loss(logits_student, logits_teacher, self.temperature),
            "loss_nd": self.nd(student_emb, teacher_emb, target),
        }
        return logits_student, losses


@register_distiller("DKDPP")
class DKDPP(_NormDirection):
    """DKD++: `CE_WEIGHT * CE + min(1, (epoch - 1) / WARMUP) * (ALPHA * TCKD + BETA * NCKD) + ND_WEIGHT * ND` (ND
    times the warm-up too with ND_WARMUP)."""

    declares = _nd_declaration("DKDPP")

    @classmethod
    def from_config(cls, cfg) -> dict:
        dkdpp = cfg.DKDPP
        return {"ce_weight": dkdpp.CE_WEIGHT, "alpha": dkdpp.ALPHA, "beta": dkdpp.BETA, "temperature": dkdpp.T,
                "nd_weight": dkdpp.ND_WEIGHT, "warmup": dkdpp.WARMUP, "nd_warmup": bool(dkdpp.ND_WARMUP),
                "centers": _centres_path("DKDPP", cfg),
                "projector_init": _projector_init(dkdpp.PROJECTOR_INIT, cfg.DATASET.TYPE),
                "reinit_student": bool(dkdpp.REINIT_STUDENT)}

    def setup(self, centers: str, ce_weight: float = 1.0, alpha: float = 1.0, beta: float = 1.0,
              temperature: float = 4.0, nd_weight: float = 1.0, warmup: float = 20.0, nd_warmup: bool = False,
              projector_init: str = "cifar", reinit_student: bool = True) -> None:
        self.ce_weight, self.alpha, self.beta, self.temperature = ce_weight, alpha, beta, temperature
        self.nd_warmup = nd_warmup
        self._setup_nd(nd_weight, warmup, centers, projector_init, reinit_student)

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, *, epoch: int, **batch):
        logits_student, logits_teacher, student_emb, teacher_emb = self.embeddings_and_logits(image)
        warm = kdpp_warmup(epoch, self.warmup)
        nd = self.nd(student_emb, teacher_emb, target)
        losses = {
            "loss_ce": self.ce_weight * cross_entropy(logits_student, target),
            "loss_kd": warm * dkd_loss(logits_student, logits_teacher, target, self.alpha, self.beta,
                                       self.temperature),
            "loss_nd": warm * nd if self.nd_warmup else nd,
        }
        return logits_student, losses
