"""Upstream mdistiller's DOT step protocol, as its trainer and people's scripts call the optimizer (the reference our
trainer's DOT update rule is compared against)."""

from __future__ import annotations

import torch


def upstream_dot_step(optimizer, loss_kd: torch.Tensor, loss_task: torch.Tensor) -> None:
    """backward of the KD loss, `step_kd()`, backward of the task loss, `step()` (upstream's order, verbatim)."""
    optimizer.zero_grad(set_to_none=True)
    loss_kd.backward(retain_graph=True)
    optimizer.step_kd()
    optimizer.zero_grad(set_to_none=True)
    loss_task.backward()
    optimizer.step()
