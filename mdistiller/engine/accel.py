"""The speed switches of a run (SOLVER.AMP, SOLVER.CHANNELS_LAST, SOLVER.COMPILE), in one place for the trainer,
tools/bench.py and the tests. Off, each is the identity: the published fp32 recipe.

- AMP: the distiller's forward (student and teacher) under bf16 autocast; every pure loss is marked `fp32_loss`
  (mdistiller.distillers.precision), so losses are computed in fp32 from the bf16 outputs. bf16 has fp32's exponent
  range: no loss scaling is needed.
- CHANNELS_LAST: parameters and 4-d input batches in NHWC, the layout cuDNN's tensor-core kernels want.
- COMPILE: `torch.compile(distiller, mode=...)` for the training forward (backward follows through AOTAutograd);
  "reduce-overhead" adds CUDA graphs. An update rule with two backward passes per forward (DOT) compiles without the
  compile caches (`keep_compile_caches_from_retained_graphs`). The optimizer step, the LR schedule and the
  checkpoints stay eager, on the original module, so state dicts keep their names.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
from torch import nn

from ..log import get_logger

log = get_logger(__name__)
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
AMP_DTYPE = torch.bfloat16


def autocast(cfg, device: torch.device) -> ContextManager:
    """bf16 autocast on `device` when SOLVER.AMP is on, else a no-op context."""
    if not cfg.SOLVER.AMP:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=AMP_DTYPE)


def memory_format(cfg) -> torch.memory_format:
    """channels_last under SOLVER.CHANNELS_LAST, else contiguous (NCHW)."""
    return torch.channels_last if cfg.SOLVER.CHANNELS_LAST else torch.contiguous_format


def prepare_module(module: nn.Module, cfg) -> nn.Module:
    """Move 4-d parameters and buffers to the run's memory format (in place; a no-op for NCHW)."""
    if cfg.SOLVER.CHANNELS_LAST:
        module.to(memory_format=torch.channels_last)
    return module


def batch_to_device(batch: dict, device: torch.device, fmt: torch.memory_format = torch.contiguous_format) -> dict:
    """Tensors of a batch dict on `device` (non-blocking from pinned memory), also inside lists and dicts (detection's
    images and targets); 4-d ones in memory format `fmt`."""
    return {key: _to_device(value, device, fmt) for key, value in batch.items()}


def _to_device(value, device: torch.device, fmt: torch.memory_format):
    if torch.is_tensor(value):
        value = value.to(device, non_blocking=True)
        if value.dim() == 4 and fmt is not torch.contiguous_format:
            value = value.contiguous(memory_format=fmt)
        return value
    if isinstance(value, list):
        return [_to_device(item, device, fmt) for item in value]
    if isinstance(value, dict):
        return {key: _to_device(item, device, fmt) for key, item in value.items()}
    return value


def compiled(module: nn.Module, cfg, backward_passes: int = 1) -> Callable:
    """`module` itself, or its torch.compile wrapper (sharing its parameters) under SOLVER.COMPILE. With more than one
    backward pass per forward (DOT), the compile caches are switched off for this process first (see
    `keep_compile_caches_from_retained_graphs`)."""
    mode = cfg.SOLVER.COMPILE
    if not mode:
        return module
    if backward_passes > 1:
        keep_compile_caches_from_retained_graphs()
    return torch.compile(module, mode=mode)


def keep_compile_caches_from_retained_graphs() -> None:
    """Switch off AOTAutograd's and inductor's compile caches in this process.

    AOTAutograd compiles the backward at the first backward call and knows then whether the saved tensors are used
    once: with `retain_graph=True` it keeps them (no donated buffers, no in-place reuse). The on-disk caches do not
    key on that: a backward compiled by an earlier run of the same graph with one backward pass (plain KD) would be
    loaded and either refuse `retain_graph=True` or overwrite saved tensors in the first pass, so the second pass
    computes wrong gradients, silently (torch 2.14, CPU). Compiling afresh costs start-up time only."""
    # imported here: torch._inductor takes seconds to import, and only a compiled DOT run needs it
    import torch._functorch.config
    import torch._inductor.config

    torch._functorch.config.enable_autograd_cache = False
    torch._inductor.config.fx_graph_cache = False
    log.info("SOLVER.COMPILE with two backward passes per step (DOT): torch.compile's caches are off in this process")


def begin_step(cfg) -> None:
    """Tell CUDA-graph trees a new training step starts (the last step's outputs may then be overwritten)."""
    if cfg.SOLVER.COMPILE in CUDA_GRAPH_MODES:
        torch.compiler.cudagraph_mark_step_begin()


def describe(cfg) -> str:
    """The switches that are on, for the log ("fp32" when none)."""
    parts = []
    if cfg.SOLVER.AMP:
        parts.append("bf16 autocast")
    if cfg.SOLVER.CHANNELS_LAST:
        parts.append("channels_last")
    if cfg.SOLVER.COMPILE:
        parts.append(f"torch.compile({cfg.SOLVER.COMPILE})")
    return ", ".join(parts) or "fp32"
