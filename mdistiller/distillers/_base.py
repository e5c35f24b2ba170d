"""The distiller interface. A distiller computes losses; it never touches the optimizer or the data loader.

A method is one module: its config section (`config.config_section`, beside the class), its hyperparameters read
from the config in one place (`from_config`, into the explicit arguments of `setup`), and one frozen `Declaration`
of what it needs from the rest of the framework, read directly by the builder, the validation pass, the data path,
the teacher-output cache, the update rule and the trainer. `@register_distiller` makes it buildable by name.

Built as upstream's `KD(student, teacher, cfg)` (`CRD(student, teacher, cfg, num_data)`: the declared build needs
follow cfg), or with plain values: `KD(student, teacher, temperature=4.0, ce_weight=0.1, kd_weight=0.9)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Iterator, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MdistillerError
from .config import check_choices
from .logit_stand import standardize_logits
from .precision import fp32_loss

# What a method reads from the teacher on a training view (Declaration.teacher_reads).
LOGITS = "logits"
FEATURES = "features"
TRAIN_MODE = "train_mode"  # the teacher runs in train mode: its outputs change as its BN statistics move

Hparams = Mapping[str, Any]


def _no_batch_needs(hparams: Hparams) -> dict[str, object]:
    return {}


def _teacher_frozen(hparams: Hparams) -> bool:
    return False


def logits_on(*views: str) -> Callable[[Hparams], dict[str, frozenset[str]]]:
    """A `teacher_reads` for a method that reads only the teacher's logits on `views` (the cache can serve it)."""

    def reads(hparams: Hparams) -> dict[str, frozenset[str]]:
        return {view: frozenset({LOGITS}) for view in views}

    return reads


@dataclass(frozen=True)
class Declaration:
    """What a method needs from the framework. The callables take the method's hyperparameters (`from_config`'s
    dict), never the config: the config is read in one place."""

    # every loss name forward_train may return, and those that distil from the teacher (DOT's KD momentum, reports);
    # the others are task terms
    loss_terms: tuple[str, ...]
    distillation_terms: tuple[str, ...] = ()
    # the top-level config sections from_config reads besides the shared ones (its own and borrowed, e.g. MLKD: KD)
    config_sections: tuple[str, ...] = ()
    requires_teacher: bool = True
    # batch key -> training view name (mdistiller.dataset's views); forward_train receives these keys
    train_views: Mapping[str, str] = field(default_factory=lambda: {"image": "standard"})
    # batch key -> what the method reads from the teacher there (LOGITS / FEATURES); None: logits and features on
    # every view, so a method that says nothing is never served stale logits by the teacher-output cache
    teacher_reads: Optional[Callable[[Hparams], Mapping[str, frozenset[str]]]] = None
    # whether the teacher trains along in train mode (its BN statistics move every step; weights stay frozen)
    teacher_train_mode: Callable[[Hparams], bool] = _teacher_frozen
    # what the training batches must carry besides the views, "target" and "index" (need -> parameters)
    batch_needs: Callable[[Hparams], dict[str, object]] = _no_batch_needs
    # constructor arguments the builder serves after cfg, in this order (engine/build.py BUILD_FACTS)
    build_needs: tuple[str, ...] = ()
    # child modules trained beside the student (projectors, temperatures, heads); the optimizer takes them
    extra_modules: tuple[str, ...] = ()
    # how `--logit-stand --base-temp --kd-weight` map onto the method's keys: f(cfg, base_temp, kd_weight) writes
    # them; None: not a logit method, the flags are refused
    logit_stand: Optional[Callable[[Any, float, float], None]] = None
    logit_stand_refusal: str = ""  # for a method without the mapping: why, instead of the generic line
    # SOLVER.TRAINER names of upstream's trainers that train this method as our one trainer does
    upstream_trainers: tuple[str, ...] = ("base",)
    # whether "target" may be (B, C) soft labels (DATASET.MIXUP)
    accepts_soft_targets: bool = False
    # state-dict names of buffers the method keeps equal across ranks itself (DDP must not broadcast them)
    rank_synced_buffers: tuple[str, ...] = ()
    # what the method trains (engine/tasks.py): "classification" (image -> logits) or "detection" (Faster R-CNN on
    # COCO-format data); the data set's DATASET.TYPE declares the same, and validation refuses a mismatch
    task: str = "classification"

    def __post_init__(self) -> None:
        object.__setattr__(self, "train_views", MappingProxyType(dict(self.train_views)))
        unknown = set(self.distillation_terms) - set(self.loss_terms)
        if unknown:
            raise ValueError(f"distillation_terms {sorted(unknown)} are not among loss_terms {self.loss_terms}")
        if not self.requires_teacher and self.distillation_terms:
            raise ValueError("a method without a teacher has no distillation terms")

    def teacher_uses(self, hparams: Hparams) -> dict[str, frozenset[str]]:
        """What the method reads from the teacher per training view, TRAIN_MODE added when the teacher trains."""
        if not self.requires_teacher:
            return {}
        train_mode = {TRAIN_MODE} if self.teacher_train_mode(hparams) else set()
        if self.teacher_reads is None:
            return {key: frozenset({LOGITS, FEATURES} | train_mode) for key in self.train_views}
        return {key: frozenset(set(uses) | train_mode) for key, uses in self.teacher_reads(hparams).items()}


class Distiller(nn.Module):
    """A student, an optional frozen teacher, and the losses between them."""

    declares: ClassVar[Declaration]

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, cfg=None, *build_facts, **hparams):
        super().__init__()
        declares = type(self).declares
        if cfg is not None:
            extra = sorted(set(hparams) - set(declares.build_needs))
            if extra:
                raise TypeError(f"{type(self).__name__}: pass either cfg or hyperparameters ({', '.join(extra)}), "
                                f"not both")
            hparams = {**type(self).hparams(cfg), **hparams}
        if len(build_facts) > len(declares.build_needs):
            raise TypeError(f"{type(self).__name__} takes {len(declares.build_needs)} build argument(s) after cfg "
                            f"({', '.join(declares.build_needs) or 'none'}), got {len(build_facts)}")
        hparams = {**hparams, **dict(zip(declares.build_needs, build_facts))}
        if not declares.requires_teacher:
            teacher = None
        elif teacher is None:
            raise MdistillerError(f"{type(self).__name__} distils from a teacher: build it with one")
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        self.logit_stand = bool(hparams.pop("logit_stand", False))
        if self.logit_stand and declares.logit_stand is None:
            raise MdistillerError(f"{type(self).__name__} is not a logit method: logit standardisation does not apply")
        # False: the teacher stays in eval mode (frozen BN statistics) and runs under inference_mode. True (upstream's
        # OFD): in training it is in train mode, its BN running stats drift every step under no_grad; its weights
        # never change (requires_grad False, not in the optimizer)
        self.teacher_train_mode = bool(declares.teacher_train_mode(hparams))
        self.setup(**hparams)

    @classmethod
    def from_config(cls, cfg) -> dict[str, Any]:
        """The method's hyperparameters read from the config into `setup`'s explicit arguments: the one place a
        method reads its keys; refuses values no run can use (one-line MdistillerError)."""
        return {}

    @classmethod
    def hparams(cls, cfg) -> dict[str, Any]:
        """`from_config`, plus `logit_stand` (EXPERIMENT.LOGIT_STAND) for a logit method."""
        check_choices(cfg, cls.declares.config_sections)
        hparams = cls.from_config(cfg)
        if cls.declares.logit_stand is not None:
            hparams["logit_stand"] = bool(cfg.EXPERIMENT.LOGIT_STAND)
        return hparams

    @classmethod
    def batch_needs_of(cls, cfg) -> dict[str, object]:
        """What a run of this config's batches must carry for the method (Declaration.batch_needs)."""
        return cls.declares.batch_needs(cls.hparams(cfg))

    def setup(self, **hparams: Any) -> None:
        """Build the method's modules and keep its hyperparameters (student and teacher are set)."""
        if hparams:
            raise TypeError(f"{type(self).__name__}.setup got unexpected hyperparameters {sorted(hparams)}")

    def train(self, mode: bool = True) -> Distiller:
        """Train mode for everything but the teacher, which stays in eval (frozen BN statistics) unless
        `teacher_train_mode` asks for it to train along."""
        super().train(mode)
        if self.teacher is not None and not (mode and self.teacher_train_mode):
            self.teacher.eval()
        return self

    def get_learnable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer updates: every parameter outside the teacher."""
        return [p for name, p in self.named_parameters() if not name.startswith("teacher.") and p.requires_grad]

    def get_extra_parameters(self) -> int:
        """Number of learnable parameters the method adds to the student."""
        student = sum(p.numel() for p in self.student.parameters())
        return sum(p.numel() for p in self.get_learnable_parameters()) - student

    def epoch_metrics(self) -> dict[str, float]:
        """Method-specific scalars logged once per epoch."""
        return {}

    def distill_logits(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor):
        """The logits a logit loss should compare: z-scored when EXPERIMENT.LOGIT_STAND is on, raw otherwise."""
        if self.logit_stand:
            return standardize_logits(student_logits), standardize_logits(teacher_logits)
        return student_logits, teacher_logits

    def teacher_forward(self, image: torch.Tensor):
        """Teacher (logits, feats) without building a graph: under `inference_mode`, the outputs then cloned into
        ordinary tensors (a loss may save them for its backward, which inference tensors forbid). Inside
        torch.compile, under `no_grad` (the compiled graph has no autograd bookkeeping to skip). A teacher in train
        mode (`teacher_train_mode`) also runs under `no_grad`: its BN running statistics are updated in place, and
        they must stay ordinary tensors."""
        if torch.compiler.is_compiling() or self.teacher.training:
            with torch.no_grad():
                return self.teacher(image)
        with torch.inference_mode():
            outputs = self.teacher(image)
        return _clone_tensors(outputs)

    def teacher_logits(self, image: torch.Tensor, cached: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's logits on `image`: `cached` when the batch carries them (the teacher-output cache's, looked
        up by the trainer as "teacher_logits"), else a live `teacher_forward`."""
        if cached is not None:
            return cached
        return self.teacher_forward(image)[0]

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **batch) -> tuple[torch.Tensor, dict]:
        """(student logits, {loss name: scalar tensor}); the trainer sums the losses."""
        raise NotImplementedError

    def forward_test(self, image: torch.Tensor) -> torch.Tensor:
        """Student logits."""
        return self.student(image)[0]

    def forward(self, **batch):
        if self.training:
            return self.forward_train(**batch)
        return self.forward_test(batch["image"])

    def named_extra_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """Child modules other than student and teacher (projectors, temperature modules)."""
        for name, module in self.named_children():
            if name not in ("student", "teacher"):
                yield name, module


def _clone_tensors(value):
    if torch.is_tensor(value):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone_tensors(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_clone_tensors(v) for v in value)
    return value


@fp32_loss
def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Batch-mean cross-entropy in fp32."""
    return F.cross_entropy(logits.float(), target)
