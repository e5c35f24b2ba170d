"""Batch-level label mixing (DATASET.MIXUP): Mixup / CutMix with label smoothing, as DeiT trains, through timm.

Applied by the trainer to each training batch on the device, after loading: the images are mixed in place and
"target" becomes a (B, C) float tensor of soft labels. Only distillers whose losses take soft labels
(`Declaration.accepts_soft_targets`: cross-entropy with probabilities, KL to the teacher) can train on them; the others
are refused when the run is built. timm is the optional `[vit]` extra; it is imported only when mixing is on.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import MdistillerError

VIT_EXTRA = 'pip install -e ".[vit]"'


def mixing_enabled(cfg) -> bool:
    """Whether DATASET.MIXUP asks for Mixup, CutMix or label smoothing."""
    mix = cfg.DATASET.MIXUP
    return mix.MIXUP_ALPHA > 0 or mix.CUTMIX_ALPHA > 0 or mix.LABEL_SMOOTHING > 0


def build_batch_mixer(cfg, num_classes: int) -> Callable[[dict], dict] | None:
    """The batch transform of DATASET.MIXUP (None when off); a missing timm or an odd batch is a one-line error."""
    if not mixing_enabled(cfg):
        return None
    try:
        from timm.data import Mixup
        from timm.data.mixup import mixup_target
    except ImportError:
        raise MdistillerError(f"DATASET.MIXUP uses timm's Mixup/CutMix: install it with {VIT_EXTRA}") from None
    mix = cfg.DATASET.MIXUP
    if cfg.SOLVER.BATCH_SIZE % 2:
        raise MdistillerError(f"DATASET.MIXUP pairs the images of a batch: SOLVER.BATCH_SIZE must be even, "
                              f"got {cfg.SOLVER.BATCH_SIZE}")
    mixes = mix.MIXUP_ALPHA > 0 or mix.CUTMIX_ALPHA > 0
    mixer = Mixup(mixup_alpha=mix.MIXUP_ALPHA, cutmix_alpha=mix.CUTMIX_ALPHA, prob=mix.PROB,
                  switch_prob=mix.SWITCH_PROB, mode="batch", label_smoothing=mix.LABEL_SMOOTHING,
                  num_classes=num_classes)

    def apply(batch: dict) -> dict:
        image, target = batch["image"], batch["target"]
        if mixes and len(target) % 2 == 0:
            image, target = mixer(image, target)
        else:  # smoothing only, or an odd last batch (timm pairs image i with B-1-i): soft labels, no mixing
            target = mixup_target(target, num_classes, lam=1.0, smoothing=mix.LABEL_SMOOTHING)
        return {**batch, "image": image, "target": target}

    return apply


def hard_labels(target: torch.Tensor) -> torch.Tensor:
    """Class indices of a batch's targets: the argmax of soft labels, the labels themselves otherwise."""
    return target.argmax(1) if target.dim() > 1 else target
