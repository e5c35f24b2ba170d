"""The distiller interface. A distiller computes losses; it never touches the optimizer or the data loader.

What a method needs from the trainer it declares here instead of the trainer branching on its name:
- `requires_teacher`: whether a teacher is built and loaded;
- `train_views`: batch key -> training view name (see mdistiller.dataset.TRAIN_VIEWS);
- `get_learnable_parameters()`: student parameters plus any extra modules (projectors, temperatures);
- `epoch_metrics()`: scalars to log once per epoch (e.g. a learned temperature);
- `apply_logit_stand_flags(cfg, base_temp, kd_weight)`: how `--logit-stand` maps onto the method's keys;
- `accepts_soft_targets`: whether its losses train on the soft labels of DATASET.MIXUP;
- `batch_needs(cfg)`: what the training batches must carry besides the views, "target" and "index" (e.g. CRD's
  negative indices), served by the data path (mdistiller.dataset.BATCH_NEEDS);
- `upstream_trainers`: the names of upstream's trainer classes (SOLVER.TRAINER) that describe how it trains;
- `build_needs`: keyword arguments its constructor takes besides (student, teacher, cfg), served by the builder from
  the built data (engine/build.py BUILD_FACTS: "num_data", the training-set size, for CRD);
- `check_cfg(cfg)`: its own keys' checks, run by the validation pass before anything is built;
- `rank_synced_buffers`: buffers it keeps equal on every rank itself under torchrun (DDP does not broadcast them);
- `teacher_train_mode`: whether the teacher runs in train mode while the distiller trains (see the attribute);
- `teacher_outputs(cfg)`: what it reads from the teacher on each training view: `LOGITS` alone lets the teacher-output
  cache (DISTILLER.TEACHER_CACHE) serve it; `FEATURES` or `TRAIN_MODE` (a teacher whose BN statistics move) refuse
  the cache. The default declares features, so a method that says nothing is never served stale logits. A method
  the cache can serve reads the teacher through `teacher_logits(image, batch.get("teacher_logits"))`.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MdistillerError
from .logit_stand import standardize_logits
from .precision import fp32_loss

# What a method reads from the teacher on a training view (its `teacher_outputs(cfg)`).
LOGITS = "logits"
FEATURES = "features"
TRAIN_MODE = "train_mode"  # the teacher runs in train mode: its outputs change as its BN statistics move


class Distiller(nn.Module):
    """A student, an optional frozen teacher, and the losses between them."""

    requires_teacher: bool = True
    train_views: Mapping[str, str] = {"image": "standard"}
    supports_logit_stand: bool = False
    accepts_soft_targets: bool = False  # whether "target" may be (B, C) soft labels (DATASET.MIXUP)
    upstream_trainers: tuple[str, ...] = ("base",)  # SOLVER.TRAINER names this method trains with
    # False: the teacher stays in eval mode (frozen BN statistics) and runs under inference_mode. True: in training
    # the teacher is in train mode (upstream's OFD): its BN layers normalise with batch statistics and their running
    # stats drift every step, under no_grad; its weights never change (requires_grad False, not in the optimizer).
    # A class attribute a method sets, or an instance attribute set in its __init__ from a config switch.
    teacher_train_mode: bool = False
    build_needs: tuple[str, ...] = ()  # constructor keywords the builder serves (see engine/build.py BUILD_FACTS)
    rank_synced_buffers: tuple[str, ...] = ()  # state-dict names of buffers the method syncs across ranks itself

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, cfg=None):
        super().__init__()
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        self.logit_stand = bool(cfg is not None and cfg.EXPERIMENT.LOGIT_STAND)

    def train(self, mode: bool = True) -> Distiller:
        """Train mode for everything but the teacher, which stays in eval (frozen BN statistics) unless
        `teacher_train_mode` asks for it to train along."""
        super().train(mode)
        if self.teacher is not None and not (mode and self.teacher_train_mode):
            self.teacher.eval()
        return self

    @classmethod
    def check_cfg(cls, cfg) -> None:
        """Reject values of the method's own keys that no run can use (one-line MdistillerError)."""

    @classmethod
    def batch_needs(cls, cfg) -> dict[str, object]:
        """What the training batches must carry besides the views, "target" and "index": need -> parameters."""
        return {}

    @classmethod
    def teacher_outputs(cls, cfg) -> dict[str, frozenset[str]]:
        """What the method reads from the teacher, per training-view batch key (LOGITS, FEATURES, TRAIN_MODE); the
        default, logits and features on every view, keeps the teacher-output cache off for undeclared methods."""
        if not cls.requires_teacher:
            return {}
        uses = {LOGITS, FEATURES} | ({TRAIN_MODE} if cls.teacher_train_mode else set())
        return {key: frozenset(uses) for key in cls.train_views}

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

    @classmethod
    def apply_logit_stand_flags(cls, cfg, base_temp: float, kd_weight: float) -> None:
        """Map `--logit-stand --base-temp --kd-weight` onto this method's config keys."""
        raise MdistillerError(
            f"--logit-stand applies to logit methods; DISTILLER.TYPE {cfg.DISTILLER.TYPE} is not one"
        )

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
