"""Logit standardisation (Sun et al., CVPR 2024): the one z-score transform every logit method applies."""

from __future__ import annotations

import torch

from .precision import fp32_loss


@fp32_loss
def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-sample z-score over classes, `(z - mean) / (std + eps)`, std unbiased (divides by C - 1) as the reference."""
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (std + eps)
