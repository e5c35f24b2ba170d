"""A run's per-epoch record: `worklog.txt` (written, truncated on resume and read back, in one place) and the
TensorBoard / Weights & Biases writers beside it.

worklog.txt holds one block per epoch, mdistiller's format:
```
-------------------------
epoch: 3
lr: 0.05
loss_ce: 1.2345
...
-------------------------
```
and, once the run has finished, a last `best_acc<TAB><value>` line. A killed run may have written blocks past the
`latest` checkpoint: resume drops them (`truncate_from`), and readers keep the last block of an epoch written twice.
Lines starting with `# ` between blocks are notes (a recipe change accepted by --resume-changed): readers skip them,
resume keeps them.
"""

from __future__ import annotations

import os
import re
from typing import Iterator

from tensorboardX import SummaryWriter

from ..errors import MdistillerError
from ..files import atomic_write_text
from ..log import get_logger
from .cfg import cfg_to_dict

WORKLOG = "worklog.txt"
_DASHES = "-" * 25
NOTE = "# "
_VALUE_LINE = re.compile(r"^([A-Za-z0-9_.\-]+): ([-+\w.]+)$")

log = get_logger(__name__)


def _blocks(lines: list[str]) -> Iterator[tuple[int | None, list[str]]]:
    """(epoch, lines) of each complete block (dashes, "epoch: N", key: value..., dashes), in file order."""
    block: list[str] = []
    epoch = None
    for line in lines:
        if line.startswith("-----") and block:
            block.append(line)
            yield epoch, block
            block, epoch = [], None
        elif line.startswith("-----"):
            block = [line]
        elif block:
            block.append(line)
            match = re.fullmatch(r"epoch: (\d+)", line.strip())
            if match and epoch is None:
                epoch = int(match.group(1))
        elif line.startswith(NOTE):
            yield None, [line]


def epoch_block(epoch: int, lr: float, metrics: dict[str, float]) -> str:
    """The text of one epoch's block."""
    lines = [_DASHES, f"epoch: {epoch}", f"lr: {lr:.6g}", *(f"{k}: {v:.4f}" for k, v in metrics.items()), _DASHES]
    return os.linesep.join(lines) + os.linesep


def append(run_dir: str, text: str) -> None:
    """Append text to the run's worklog (an OSError becomes a one-line MdistillerError)."""
    path = os.path.join(run_dir, WORKLOG)
    try:
        with open(path, "a") as f:
            f.write(text)
    except OSError as exc:
        raise MdistillerError(f"could not write {path}: {exc.strerror or exc}") from None


def write_epoch(run_dir: str, epoch: int, lr: float, metrics: dict[str, float]) -> None:
    """Append one epoch's block."""
    append(run_dir, epoch_block(epoch, lr, metrics))


def write_final(run_dir: str, best_acc: float) -> None:
    """The line a finished run ends its worklog with."""
    append(run_dir, f"best_acc\t{best_acc:.4f}{os.linesep}")


def truncate_from(run_dir: str, start_epoch: int) -> None:
    """Drop what a killed run wrote past `latest`: the blocks of epochs >= start_epoch and the final best_acc line."""
    path = os.path.join(run_dir, WORKLOG)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.read().splitlines()
    keep = [line for epoch, block in _blocks(lines)
            if (epoch is not None and epoch < start_epoch) or block[0].startswith(NOTE) for line in block]
    if keep != lines:
        atomic_write_text(path, "".join(line + os.linesep for line in keep))


def read(path: str) -> list[dict[str, float]]:
    """The per-epoch blocks of a worklog.txt as dicts (`epoch`, `lr`, loss terms, accuracies, ...), one per epoch in
    order (an epoch written twice by a resumed run: the last block counts). `path` may be the run folder."""
    if os.path.isdir(path):
        path = os.path.join(path, WORKLOG)
    if not os.path.isfile(path):
        raise MdistillerError(f"worklog not found: {path}")
    with open(path) as f:
        lines = f.read().splitlines()
    by_epoch: dict[int, dict[str, float]] = {}
    for epoch, block in _blocks(lines):
        if epoch is None:
            continue
        values: dict[str, float] = {}
        for line in block:
            match = _VALUE_LINE.match(line.strip())
            if match:
                try:
                    values[match.group(1)] = float(match.group(2))
                except ValueError:
                    pass
        by_epoch[epoch] = values
    return [by_epoch[e] for e in sorted(by_epoch)]


class MetricWriters:
    """TensorBoard (always, rank 0) and Weights & Biases (LOG.WANDB, when installed and it starts) for one run."""

    def __init__(self, run_dir: str, cfg, resume_epoch: int | None, enabled: bool = True):
        self.tensorboard: SummaryWriter | None = None
        self.wandb_run = None
        if not enabled:
            return
        # purge_step hides the events a killed run logged past `latest` from TensorBoard
        self.tensorboard = SummaryWriter(os.path.join(run_dir, "train.events"), purge_step=resume_epoch)
        if cfg.LOG.WANDB:
            self.wandb_run = _open_wandb(run_dir, cfg)

    def write(self, epoch: int, lr: float, metrics: dict[str, float]) -> None:
        """One epoch's scalars."""
        if self.tensorboard is not None:
            for name, value in metrics.items():
                self.tensorboard.add_scalar(name, value, epoch)
            self.tensorboard.add_scalar("lr", lr, epoch)
            self.tensorboard.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({**metrics, "lr": lr}, step=epoch)

    def close(self) -> None:
        """Flush and close both."""
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _open_wandb(run_dir: str, cfg):
    """LOG.WANDB: a wandb run when wandb is installed and starts; otherwise say so and go on without it."""
    try:
        import wandb  # optional: never a dependency
    except ImportError:
        log.warning("LOG.WANDB is True but wandb is not installed (pip install wandb): logging to tensorboard only")
        return None
    try:
        return wandb.init(project=cfg.EXPERIMENT.PROJECT, name=os.path.basename(run_dir),
                          config=cfg_to_dict(cfg), dir=run_dir, resume="allow")
    except Exception as exc:  # offline machine, no login, ...
        log.warning(f"wandb did not start ({type(exc).__name__}: {str(exc)[:80]}): logging to tensorboard only")
        return None
