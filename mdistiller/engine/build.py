"""Build what a config describes: models, teacher weights, distiller."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from torch import nn

from ..distillers import get_distiller_class
from ..models import cifar_model_dict
from .checkpoint import load_model_weights
from .errors import MdistillerError

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def model_builder(name: str):
    """The zoo builder for a model name; an unknown name says which names exist."""
    if name not in cifar_model_dict:
        close = difflib.get_close_matches(name, list(cifar_model_dict), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise MdistillerError(f"unknown model {name!r}{hint}; CIFAR models: {', '.join(cifar_model_dict)}")
    return cifar_model_dict[name][0]


def build_model(name: str, num_classes: int) -> nn.Module:
    """A fresh zoo model."""
    return model_builder(name)(num_classes=num_classes)


def resolve_checkpoint_path(path: str) -> str:
    """A relative path is looked up in the working directory, then in the project root (the zoo's layout)."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    in_project = PROJECT_ROOT / path
    return str(in_project) if in_project.exists() else path


def teacher_checkpoint_path(cfg) -> str:
    """DISTILLER.TEACHER_CKPT when set, else the zoo's published path for DISTILLER.TEACHER."""
    if cfg.DISTILLER.TEACHER_CKPT:
        return resolve_checkpoint_path(cfg.DISTILLER.TEACHER_CKPT)
    model_builder(cfg.DISTILLER.TEACHER)
    zoo_path = cifar_model_dict[cfg.DISTILLER.TEACHER][1]
    if zoo_path is None:
        raise MdistillerError(
            f"the zoo has no published checkpoint for teacher {cfg.DISTILLER.TEACHER}: train one with "
            f"configs/cifar100/vanilla/{cfg.DISTILLER.TEACHER}.yaml and pass DISTILLER.TEACHER_CKPT <its student_best>"
        )
    path = resolve_checkpoint_path(zoo_path)
    if not os.path.isfile(path):
        raise MdistillerError(
            f"teacher checkpoint not found: {zoo_path}. Unpack cifar_teachers.tar into download_ckpts/ "
            f"(see download_ckpts/README.md), or pass DISTILLER.TEACHER_CKPT <path>"
        )
    return path


def build_teacher(cfg, num_classes: int) -> nn.Module:
    """The teacher with its checkpoint loaded, in eval mode."""
    teacher = build_model(cfg.DISTILLER.TEACHER, num_classes)
    load_model_weights(teacher, teacher_checkpoint_path(cfg), cfg.DISTILLER.TEACHER, num_classes, "teacher checkpoint")
    return teacher.eval()


def build_distiller(cfg, num_classes: int):
    """Student, (teacher) and the distiller of DISTILLER.TYPE."""
    distiller_class = get_distiller_class(cfg.DISTILLER.TYPE)
    student = build_model(cfg.DISTILLER.STUDENT, num_classes)
    teacher = build_teacher(cfg, num_classes) if distiller_class.requires_teacher else None
    return distiller_class(student, teacher, cfg)


def apply_logit_stand_flags(cfg, base_temp: float, kd_weight: float) -> None:
    """`--logit-stand --base-temp τ --kd-weight w`: switch LS on and let the method map τ and w onto its keys."""
    get_distiller_class(cfg.DISTILLER.TYPE).apply_logit_stand_flags(cfg, base_temp, kd_weight)
    cfg.EXPERIMENT.LOGIT_STAND = True
    cfg.EXPERIMENT.BASE_TEMP = float(base_temp)
    cfg.EXPERIMENT.KD_WEIGHT = float(kd_weight)
