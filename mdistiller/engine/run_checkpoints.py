"""A run's checkpoints: where the run stands, what each checkpoint file holds, resume, RNG states, the mid-epoch save.

Files (mdistiller's names) in the run folder:
- `latest`: `{"model", "optimizer", "epoch", "best_acc", "last_acc", "rng", "sampler_rng", "arch"}` (+ `"rng_ranks"`
  under torchrun, + `"partial"` when saved at a step inside an epoch). What --resume reads; written last
  (`epoch_end.EPOCH_END_STEPS`).
- `best`, `epoch_<n>`: the same at the best epoch / every LOG.SAVE_CHECKPOINT_FREQ epochs.
- `student_latest`, `student_best`, `student_<n>`: `{"model": student state dict, "arch", "num_classes", "epoch",
  "test_acc"}`, the published format.

Resume is exact: `latest` holds the model, the optimizer, every RNG state and the state the data sampler had when the
epoch to run next began. At an epoch boundary that is all there is; after SIGTERM/SIGINT `latest` also holds the step
reached and the epoch's running sums, and the trainer replays the sampler (loading, not training on, the batches
already seen) to continue with the very next batch. Under torchrun every rank's RNG state is saved; rank 0 writes.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .. import distributed
from ..errors import MdistillerError
from ..log import get_logger
from ..models.common import num_classes_of_model
from ..rng import get_rng_state, set_rng_state, set_seed
from .checkpoint import load_checkpoint, save_checkpoint, strip_module_prefix

log = get_logger(__name__)


class RunCheckpoints:
    """The run's position (next epoch, a mid-epoch step), its best/last accuracy and its checkpoint files."""

    def __init__(self, run_dir: str, cfg, distiller: nn.Module, optimizer: torch.optim.Optimizer,
                 sampler_generator: torch.Generator | None):
        self.run_dir, self.cfg = run_dir, cfg
        self.distiller, self.optimizer, self.generator = distiller, optimizer, sampler_generator
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.best_acc = -1.0
        self.last_acc = -1.0
        self.start_epoch = 1
        self.partial: dict | None = None  # the mid-epoch position `latest` was saved at, until it is replayed
        self.latest_holds: str | None = None  # what `latest` holds, for messages
        self.epoch_sampler_state: torch.Tensor | None = None

    def path(self, name: str) -> str:
        """A file of the run folder."""
        return os.path.join(self.run_dir, name)

    # ---- resume ----
    def resume(self) -> None:
        """Continue from `latest`: weights, optimizer, epoch (and step), best accuracy and every RNG state."""
        latest = self.path("latest")
        state = load_checkpoint(latest, "resume checkpoint")
        if "optimizer" not in state or "epoch" not in state:
            raise MdistillerError(f"{latest} is not a trainer checkpoint (no optimizer/epoch)")
        self.distiller.load_state_dict(self._with_own_teacher(strip_module_prefix(state["model"])))
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch = state["epoch"] + 1
        self.best_acc = state["best_acc"]
        self.last_acc = state.get("last_acc", -1.0)
        rng = self._rank_rng(state)
        saved_world = len(state.get("rng_ranks") or [None])
        if rng is not None:
            set_rng_state(rng)
        if self.world > 1 and saved_world != self.world and self.rank > 0:
            # saved by another number of processes: fresh, rank-distinct streams (resume is then not exact)
            set_seed(distributed.rank_seed(self.cfg.EXPERIMENT.SEED * 1_000_003 + state["epoch"], self.rank))
            rng = None
        if self.generator is not None and "sampler_rng" in state:
            self.generator.set_state(state["sampler_rng"])
        where = f"epoch {self.start_epoch}"
        self.latest_holds = f"the end of epoch {state['epoch']}"
        partial = state.get("partial")
        if partial is not None:
            self.partial = {**partial, "rng": rng}
            self.start_epoch = partial["epoch"]
            where = f"epoch {partial['epoch']}, step {partial['step'] + 1}"
            self.latest_holds = f"epoch {partial['epoch']}, step {partial['step']}"
        if saved_world != self.world:
            where += f" (saved by {saved_world} process(es), now {self.world}: the continuation is not bitwise exact)"
        log.info(f"resumed from {latest} at {where} (best top-1 {self.best_acc:.2f})")

    def saved_weights(self) -> dict:
        """The distiller's state dict less a frozen teacher's weights: they are the teacher file's (its SHA-256 is in
        identity.json), loaded again at every build, and a detection teacher is hundreds of MB a checkpoint. A teacher
        that trains along (`teacher_train_mode`: OFD's BN statistics move) is kept."""
        state = self.distiller.state_dict()
        if getattr(self.distiller, "teacher", None) is None or getattr(self.distiller, "teacher_train_mode", False):
            return state
        return type(state)((k, v) for k, v in state.items() if not k.startswith("teacher."))

    def _with_own_teacher(self, saved: dict) -> dict:
        """The saved weights (mdistiller wrapped DataParallel: prefixes stripped) with the teacher's taken from the
        distiller as built: the teacher is frozen and loaded from its checkpoint at every build; a run served by the
        teacher-output cache holds none and `saved_weights` leaves a frozen one out, so `latest` may or may not carry
        it (resume works across the two). A teacher that trains along keeps its saved BN statistics."""
        own = {k: v for k, v in self.distiller.state_dict().items() if k.startswith("teacher.")}
        if getattr(self.distiller, "teacher_train_mode", False):  # its saved BN statistics are where it stood
            own = {**own, **{k: v for k, v in saved.items() if k.startswith("teacher.")}}
        return {**{k: v for k, v in saved.items() if not k.startswith("teacher.")}, **own}

    def take_partial(self, epoch: int) -> dict | None:
        """The mid-epoch position to replay in `epoch` (once), or None."""
        partial, self.partial = self.partial, None
        return partial if partial is not None and partial["epoch"] == epoch else None

    def _rank_rng(self, state: dict) -> dict | None:
        """This rank's RNG state from a checkpoint: its own when as many processes saved it, else rank 0's."""
        ranks = state.get("rng_ranks")
        if ranks is not None and len(ranks) == self.world:
            return ranks[self.rank]
        return state.get("rng")

    # ---- what is saved ----
    def begin_epoch(self) -> None:
        """Remember the sampler state the epoch's shuffle (and worker seeds) start from (for a mid-epoch `latest`)."""
        self.epoch_sampler_state = self.generator.get_state() if self.generator is not None else None

    def end_epoch(self, epoch: int, test_acc: float) -> bool:
        """Record the epoch's test top-1; whether it is the best so far."""
        self.last_acc = test_acc
        is_best = test_acc > self.best_acc
        self.best_acc = max(self.best_acc, test_acc)
        self.latest_holds = f"the end of epoch {epoch}"
        return is_best

    def end_epoch_unevaluated(self, epoch: int) -> None:
        """A period that ends without evaluation (the iteration schedule's SOLVER.EVAL_PERIOD): last and best stay."""
        self.latest_holds = f"the end of period {epoch}"

    def trainer_state(self, epoch: int) -> dict:
        """The full training state after `epoch` complete epochs (a collective under torchrun: every rank calls it)."""
        state = {
            "model": self.saved_weights(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": epoch,  # complete epochs
            "best_acc": self.best_acc,
            "last_acc": self.last_acc,
            "rng": get_rng_state(),
            "arch": self.cfg.DISTILLER.STUDENT,
        }
        if self.world > 1:
            state["rng_ranks"] = distributed.all_gather_object(state["rng"])
        if self.generator is not None:  # the state the next epoch's shuffle (and worker seeds) start from
            state["sampler_rng"] = self.generator.get_state()
        return state

    def student_state(self, epoch: int, test_acc: float) -> dict:
        """The student's weights in the published format, with what they are."""
        student = self.distiller.student
        return {"model": student.state_dict(), "arch": self.cfg.DISTILLER.STUDENT,
                "num_classes": num_classes_of_model(student), "epoch": epoch, "test_acc": test_acc}

    def save(self, state: dict, name: str) -> None:
        """Write one checkpoint file (rank 0 only; atomically)."""
        if self.rank == 0:
            save_checkpoint(state, self.path(name))

    def save_mid_epoch(self, epoch: int, step: int, stats_state: dict) -> None:
        """`latest` at a step inside `epoch`: the sampler state of the epoch's start, the step, the running sums."""
        state = self.trainer_state(epoch - 1)
        if self.epoch_sampler_state is not None:
            state["sampler_rng"] = self.epoch_sampler_state
        state["partial"] = {"epoch": epoch, "step": step, "stats": stats_state}
        self.latest_holds = f"epoch {epoch}, step {step}"
        self.save(state, "latest")

    def last_good(self) -> str:
        """What a run stopped now can be continued from, for error messages."""
        if self.latest_holds:
            return f"{self.path('latest')} (saved at {self.latest_holds}) is the last good checkpoint"
        return "no checkpoint had been written yet"
