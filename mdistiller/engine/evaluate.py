"""Evaluation: top-1, top-5 and mean cross-entropy on a test loader, summed over ranks under torchrun."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from tqdm import tqdm

from .. import distributed
from . import accel


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """Number of samples whose target is among the top-k predictions, per k (device tensors, no host sync)."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hits = pred.eq(target.view(-1, 1))
    return [hits[:, : min(k, maxk)].any(dim=1).sum() for k in ks]


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, desc: str = "eval",
             fmt: torch.memory_format = torch.contiguous_format, reduce: bool = False) -> dict[str, float]:
    """Top-1, top-5 (percent) and mean cross-entropy of `model(image) -> logits` (or (logits, feats)) on a loader.

    With reduce under torchrun, each rank holds a share of the test set: the sums are added over the ranks.
    """
    was_training = model.training
    model.eval()
    correct1 = torch.zeros((), device=device)
    correct5 = torch.zeros((), device=device)
    loss_sum = torch.zeros((), device=device)
    count = 0
    quiet = None if distributed.is_main_process() else True
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=quiet):
        batch = accel.batch_to_device(batch, device, fmt)
        out = model(image=batch["image"]) if hasattr(model, "forward_test") else model(batch["image"])
        logits = out[0] if isinstance(out, tuple) else out
        target = batch["target"]
        loss_sum += nn.functional.cross_entropy(logits.float(), target, reduction="sum")
        c1, c5 = topk_correct(logits, target)
        correct1 += c1
        correct5 += c5
        count += len(target)
    model.train(was_training)
    if reduce and distributed.world_size() > 1:
        count_t = torch.tensor(float(count), device=device)
        totals = distributed.all_reduce_sum(torch.stack([correct1, correct5, loss_sum, count_t]).double())
        c1, c5, loss, count = totals.tolist()
        return {"top1": 100.0 * c1 / count, "top5": 100.0 * c5 / count, "loss": loss / count}
    return {
        "top1": 100.0 * correct1.item() / count,
        "top5": 100.0 * correct5.item() / count,
        "loss": loss_sum.item() / count,
    }
