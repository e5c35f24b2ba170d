"""What stops a run cleanly: non-finite losses (SOLVER.NAN_POLICY) and SIGTERM/SIGINT, with every rank agreeing.

- `NonFiniteWatch` remembers on the device the first step whose loss terms were not all finite (no host sync); the
  trainer reads it every `nan_sync_interval` steps and `NonFiniteLoss` names that step.
- `StopSignals` turns SIGTERM/SIGINT into a flag the loop checks after each step (a second Ctrl-C stops at once);
  under torchrun the ranks agree on it where the loop reads the host anyway, so they stop at the same step.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from typing import Iterator

import torch

from .. import distributed

PROGRESS_EVERY = 20  # steps between host reads on an accelerator (progress bar, NaN flag, rank agreement)


def nan_sync_interval(device: torch.device) -> int:
    """Steps between host reads of the device-side non-finite flag under SOLVER.NAN_POLICY stop.

    On the CPU every step (ops are synchronous, reading a flag costs nothing), so no bad update is ever applied; on an
    accelerator every PROGRESS_EVERY steps, so the hot loop keeps its kernels queued. The flag remembers the first bad
    step on the device, so the error names it exactly either way; the updates made after it are never saved.
    """
    return 1 if device.type == "cpu" else PROGRESS_EVERY


def loss_values(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch mean of each loss term, stacked in fp32 (device tensor, no sync)."""
    return torch.stack([term.detach().float().mean() for term in losses.values()])


class NonFiniteLoss(Exception):
    """The first step of an epoch whose loss terms were not all finite (values by term name)."""

    def __init__(self, epoch: int, step: int, steps: int | None, values: dict[str, float], unit: str = "epoch"):
        self.epoch, self.step, self.steps, self.values = epoch, step, steps, values
        bad = {k: v for k, v in values.items() if not math.isfinite(v)} or values
        self.terms = ", ".join(f"{k}={v}" for k, v in bad.items())
        super().__init__(f"non-finite loss at {unit} {epoch}, step {step}/{steps or '?'} ({self.terms})")


class NonFiniteWatch:
    """Remembers, on the device, the first step whose loss terms were not all finite and their values."""

    def __init__(self, device: torch.device):
        self.device = device
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)
        self.names: tuple[str, ...] | None = None
        self.values: torch.Tensor | None = None

    def update(self, step: int, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Record this step's terms; returns a 0-d device bool, True when one of them is not finite (no sync)."""
        names = tuple(losses)
        values = loss_values(losses)
        bad = ~torch.isfinite(values).all()
        if names != self.names:  # a distiller changed its loss terms: keep a recorded failure, else start over
            if self.names is not None and self.first() is not None:
                return bad
            self.names, self.values = names, values
        newly = bad & (self.first_step < 0)
        self.first_step = torch.where(newly, step, self.first_step)
        self.values = torch.where(newly, values, self.values)
        return bad

    def first(self) -> tuple[int, dict[str, float]] | None:
        """(step, {term: value}) of the first non-finite step, or None (a host sync)."""
        step = int(self.first_step)
        if step < 0:
            return None
        return step, dict(zip(self.names, self.values.tolist()))

    def raise_if_any(self, epoch: int, steps: int | None, unit: str = "epoch") -> None:
        """Raise NonFiniteLoss for the first bad step, of any rank under torchrun (every rank raises together);
        `unit`: the schedule's name for `epoch` ("period" for the iteration schedule)."""
        found = self.first()
        if distributed.world_size() > 1:
            if not distributed.any_rank(found is not None, self.device):
                return
            found = min((f for f in distributed.all_gather_object(found) if f is not None), key=lambda f: f[0])
        if found is not None:
            raise NonFiniteLoss(epoch, found[0], steps, found[1], unit)


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT stopped training after a step; `latest` holds a state that --resume continues exactly."""

    def __init__(self, signum: int, epoch: int, step: int, steps: int | None, checkpoint: str, mid_epoch: bool,
                 unit: str = "epoch"):
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
        self.epoch, self.step, self.steps, self.checkpoint, self.mid_epoch = epoch, step, steps, checkpoint, mid_epoch
        # unit: "epoch", or the iteration schedule's "period" (SOLVER.CHECKPOINT_PERIOD iterations)
        where = f"{unit} {epoch}, step {step}/{steps or '?'}" if mid_epoch else f"the end of {unit} {epoch}"
        super().__init__(f"interrupted by {self.signal_name} at {where}; {checkpoint} holds that state")


class StopSignals:
    """SIGTERM/SIGINT set a flag; the loop stops after the current step and saves. A second Ctrl-C stops now."""

    def __init__(self, device: torch.device):
        self.device = device
        self.signum: int | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        """Handlers on while inside (main thread only: signal handlers live there), the previous ones restored after."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame):  # no I/O here: the main thread may be inside a write
            if self.signum is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.signum = signum

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def requested(self, check_now: bool = True) -> bool:
        """Whether a signal asks to stop. Under torchrun the ranks agree (the largest signal number of any rank)
        only where check_now (where the loop reads the host anyway), so they stop at the same step."""
        if distributed.world_size() == 1:
            return self.signum is not None
        if not check_now:
            return False
        signum = torch.tensor(float(self.signum or 0), device=self.device)
        torch.distributed.all_reduce(signum, op=torch.distributed.ReduceOp.MAX)
        self.signum = int(signum) or None
        return self.signum is not None
