"""The progress of one pass over the training set: running sums on the device, the non-finite watch, where the LR is
set per step. The trainer keeps one per epoch; tools/bench.py one per row, so both run the same step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import distributed
from ..dataset.mixing import hard_labels
from .evaluate import topk_correct
from .guards import NonFiniteWatch


class EpochStats:
    """The running sums of one epoch, on the device (no host sync per step); saved with a mid-epoch checkpoint."""

    def __init__(self, device: torch.device):
        self.device = device
        self.loss_sums: dict[str, torch.Tensor] = {}
        self.correct = torch.zeros((), device=device)
        self.seen = 0
        self.steps = 0
        self.skipped = 0
        self.skipped_terms: list[str] = []

    def add(self, losses: dict[str, torch.Tensor], logits: torch.Tensor | None, target: torch.Tensor | None) -> None:
        """One step's loss terms, and its top-1 hits where the task's forward gives class logits (None: detection)."""
        for name, term in losses.items():
            self.loss_sums[name] = self.loss_sums.get(name, 0.0) + term.detach().mean()
        if logits is not None and target is not None:
            self.correct += topk_correct(logits.detach(), hard_labels(target), (1,))[0]
            self.seen += len(target)
        self.steps += 1

    def skip(self, bad_terms: list[str]) -> None:
        self.skipped += 1
        self.skipped_terms += [name for name in bad_terms if name not in self.skipped_terms]

    def state(self) -> dict:
        return {"loss_sums": {k: torch.as_tensor(v).detach().cpu() for k, v in self.loss_sums.items()},
                "correct": self.correct.detach().cpu(), "seen": self.seen, "steps": self.steps,
                "skipped": self.skipped, "skipped_terms": list(self.skipped_terms)}

    def _summed(self) -> tuple[list[str], torch.Tensor]:
        """The loss sums, correct and seen, each summed over the ranks (a collective)."""
        names = list(self.loss_sums)
        values = [torch.as_tensor(self.loss_sums[n], device=self.device).float() for n in names]
        seen = torch.tensor(float(self.seen), device=self.device)
        return names, distributed.all_reduce_sum(torch.stack([*values, self.correct.float(), seen]).double())

    def summed_state(self) -> dict:
        """state() with the sums over every rank (a collective): what a mid-epoch checkpoint holds under torchrun."""
        names, totals = self._summed()
        state = self.state()
        state["loss_sums"] = {n: totals[i].float().cpu() for i, n in enumerate(names)}
        state["correct"], state["seen"] = totals[-2].float().cpu(), int(totals[-1])
        state["world_size"] = distributed.world_size()
        return state

    def reduce(self) -> None:
        """In place: loss sums averaged over the ranks, correct and seen summed (the steps are the same on all)."""
        names, totals = self._summed()
        world = distributed.world_size()
        self.loss_sums = {n: (totals[i] / world).float() for i, n in enumerate(names)}
        self.correct, self.seen = totals[-2].float(), int(totals[-1])

    def load(self, state: dict) -> None:
        self.loss_sums = {k: v.to(self.device) for k, v in state["loss_sums"].items()}
        self.correct = state["correct"].to(self.device)
        self.seen, self.steps = state["seen"], state["steps"]
        self.skipped, self.skipped_terms = state["skipped"], list(state["skipped_terms"])
        saved_world = state.get("world_size", 1)
        if saved_world > 1 or distributed.world_size() > 1:
            # saved sums are over all ranks: rank 0 carries them and the others restart from zero; the loss sums
            # are rescaled to the current number of ranks, whose mean divides them by steps x ranks
            if distributed.is_main_process():
                scale = distributed.world_size() / saved_world
                self.loss_sums = {k: v * scale for k, v in self.loss_sums.items()}
            else:
                self.loss_sums = {k: torch.zeros_like(v) for k, v in self.loss_sums.items()}
                self.correct = torch.zeros_like(self.correct)
                self.seen = 0


@dataclass
class EpochProgress:
    """What the step of `epoch` reads and updates: statistics, the non-finite watch, the epoch's length (None for an
    endless iterator) and whether the LR is set at every step (cosine schedule, warm-up)."""

    epoch: int
    device: torch.device
    steps_total: int | None = None
    per_step_lr: bool = False
    stats: EpochStats = field(init=False)
    watch: NonFiniteWatch = field(init=False)

    def __post_init__(self) -> None:
        self.stats = EpochStats(self.device)
        self.watch = NonFiniteWatch(self.device)
