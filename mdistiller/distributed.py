"""The process group of a `torchrun` launch and the few collectives the trainer needs.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them nothing here does anything: one process, rank 0 of 1, every
collective the identity. Under torchrun the backend is NCCL on CUDA (device cuda:LOCAL_RANK) and gloo on the CPU.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from .errors import MdistillerError

T = TypeVar("T")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_by_torchrun() -> bool:
    """Whether torchrun's environment variables are set."""
    return all(name in os.environ for name in TORCHRUN_VARS)


def is_initialized() -> bool:
    """Whether a process group is up."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """This process's rank on its node (torchrun's LOCAL_RANK; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", 0)) if is_initialized() else 0


def is_main_process() -> bool:
    """Rank 0, the only process that writes files and prints."""
    return rank() == 0


def device() -> torch.device:
    """cuda:LOCAL_RANK under torchrun on CUDA, else CUDA when present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank()) if is_initialized() else torch.device("cuda")
    return torch.device("cpu")


def setup() -> bool:
    """Start the process group from torchrun's variables; False (and nothing done) without them or when up already."""
    if not launched_by_torchrun() or is_initialized():
        return False
    if not dist.is_available():
        raise MdistillerError("torchrun started this process but this torch build has no torch.distributed")
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def teardown() -> None:
    """Destroy the process group if one is up."""
    if is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """setup() on entry, teardown() on exit (only of a group this context started)."""
    started = setup()
    try:
        yield
    finally:
        if started:
            teardown()


def barrier() -> None:
    """Wait for every rank (a no-op alone)."""
    if world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[local_rank()])
        else:
            dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a device tensor over the ranks, in place; returns it (unchanged alone)."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Every rank's `tensor` concatenated in rank order (the tensor itself alone). Each rank's must have at most
    `rows` rows (at least one); shorter ones travel padded to `rows` with copies of their first row, so the result
    may repeat a row of a rank, never mix rows of two."""
    if world_size() == 1:
        return tensor
    if not 0 < len(tensor) <= rows:
        raise ValueError(f"all_gather_rows: {len(tensor)} rows, expected 1 to {rows}")
    if len(tensor) < rows:
        tensor = torch.cat([tensor, tensor[:1].expand(rows - len(tensor), *tensor.shape[1:])])
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def any_rank(flag: bool | torch.Tensor, on: torch.device) -> bool:
    """Whether `flag` holds on at least one rank (a host sync; the flag itself alone)."""
    if world_size() == 1:
        return bool(flag)
    value = torch.as_tensor(flag, device=on).detach().reshape(()).to(torch.float32).clone()
    return bool(all_reduce_sum(value) > 0)


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank src's picklable object on every rank."""
    if world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(obj: Any) -> list:
    """Every rank's picklable object, in rank order."""
    if world_size() == 1:
        return [obj]
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_tensors(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite the tensors with rank src's values, in place."""
    if world_size() > 1:
        for tensor in tensors:
            dist.broadcast(tensor, src=src)


def on_main_then_share(fn: Callable[[], T]) -> T | None:
    """Run fn on rank 0 only; its MdistillerError is raised on every rank (so no rank waits for a failed one)."""
    error = None
    result = None
    if is_main_process():
        try:
            result = fn()
        except MdistillerError as exc:
            error = str(exc)
    error = broadcast_object(error)
    if error is not None:
        raise MdistillerError(error)
    return result


@contextlib.contextmanager
def raised_on_every_rank() -> Iterator[None]:
    """Mark an MdistillerError raised inside as one that every rank raises alike (a config or pre-flight check)."""
    try:
        yield
    except MdistillerError as exc:
        exc.on_every_rank = True  # type: ignore[attr-defined]
        raise


def reported_here(exc: BaseException) -> bool:
    """Whether this process prints the error: always, but on ranks > 0 not one that every rank raised alike."""
    return not getattr(exc, "on_every_rank", False) or int(os.environ.get("RANK", "0")) == 0


def rank_seed(seed: int, rank_: int) -> int:
    """A 63-bit seed mixed from a run seed and a rank (different streams for different ranks)."""
    return int(np.random.SeedSequence([int(seed) % 2**63, int(rank_)]).generate_state(1, np.uint64)[0] >> 1)


def shard_bounds(count: int, rank_: int, world: int) -> tuple[int, int]:
    """[start, end) of rank's contiguous share of `count` items: sizes differ by one at most, none is counted twice."""
    base, extra = divmod(count, world)
    start = rank_ * base + min(rank_, extra)
    return start, start + base + (1 if rank_ < extra else 0)
