"""Where the distiller runs: on the device, in the run's memory format, wrapped by DistributedDataParallel under
torchrun (the teacher excluded) and compiled under SOLVER.COMPILE. Evaluation, the optimizer and the checkpoints use
the unwrapped module, so state dicts keep their names.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import distributed
from ..errors import MdistillerError
from . import accel
from .optim import backward_passes


def check_distributed(cfg, device: torch.device, world: int) -> None:
    """What a run of `world` processes cannot do: a global batch they cannot split evenly, SyncBN off CUDA."""
    if world > 1 and cfg.SOLVER.BATCH_SIZE % world:
        raise MdistillerError(
            f"SOLVER.BATCH_SIZE {cfg.SOLVER.BATCH_SIZE} (the global batch) is not divisible by the {world} processes "
            f"torchrun started: use a multiple of {world} or another --nproc_per_node"
        )
    if world > 1 and cfg.DISTRIBUTED.SYNC_BN and torch.device(device).type != "cuda":
        raise MdistillerError("DISTRIBUTED.SYNC_BN needs CUDA devices (NCCL); set it False for a CPU run")


def sync_batchnorm(distiller: nn.Module) -> nn.Module:
    """Every BatchNorm outside the teacher as SyncBatchNorm (same parameters and state-dict names)."""
    for name, child in list(distiller.named_children()):
        if name != "teacher":
            setattr(distiller, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    return distiller


def wrap_ddp(distiller: nn.Module, cfg, device: torch.device) -> DistributedDataParallel:
    """DistributedDataParallel around the distiller, the teacher's parameters and buffers neither reduced nor
    broadcast (each rank loaded the same frozen teacher), nor the buffers the distiller keeps equal on every rank
    itself (`Declaration.rank_synced_buffers`: CRD's memories, which a broadcast per step would only copy again)."""
    ignored = [name for name, _ in itertools.chain(distiller.named_parameters(), distiller.named_buffers())
               if name.startswith("teacher.")]
    ignored += list(distiller.declares.rank_synced_buffers)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(distiller, ignored)
    return DistributedDataParallel(
        distiller, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=bool(cfg.DISTRIBUTED.FIND_UNUSED_PARAMETERS),
    )


@dataclass
class Placement:
    """The distiller on its device (`module`), its DDP wrapper (None alone) and the training forward to call
    (`forward`: the module itself when neither wrapped nor compiled)."""

    module: nn.Module
    ddp: DistributedDataParallel | None
    forward: Callable
    memory_format: torch.memory_format


def place(distiller: nn.Module, cfg, device: torch.device) -> Placement:
    """Move the distiller to `device`, convert its BN under DISTRIBUTED.SYNC_BN, set the memory format, wrap it in DDP
    under torchrun (rank 0's weights are broadcast now, gradients reduced in backward) and compile its forward."""
    world = distributed.world_size()
    check_distributed(cfg, device, world)
    distiller = distiller.to(device)
    if world > 1 and cfg.DISTRIBUTED.SYNC_BN:
        distiller = sync_batchnorm(distiller)
    module = accel.prepare_module(distiller, cfg)
    ddp = wrap_ddp(module, cfg, device) if world > 1 else None
    forward = accel.compiled(ddp if ddp is not None else module, cfg, backward_passes(cfg))
    return Placement(module, ddp, forward, accel.memory_format(cfg))
