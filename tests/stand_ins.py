"""Stand-in models for loss-level tests of distillers."""

from __future__ import annotations

import torch
from torch import nn


class SlotLogits(nn.Module):
    """A stand-in model whose "image" (B, 2, C) carries the logits: slot 0 for the student, 1 for the teacher."""

    def __init__(self, slot: int):
        super().__init__()
        self.slot = slot
        self.anchor = nn.Parameter(torch.zeros(()))  # so the module has a parameter like a real model

    def forward(self, x: torch.Tensor):
        return x[:, self.slot] + 0.0 * self.anchor, {}
