"""Losses in fp32 under SOLVER.AMP.

The trainer runs the whole distiller forward under bf16 autocast, which would also put a loss's matmuls (Sinkhorn
iterations, MLKD's correlation matrices, CKA) in bf16. `fp32_loss` marks a pure loss function: inside it autocast
is off and its floating-point tensor arguments are cast to fp32, so every loss is computed exactly as without AMP
from the (bf16) logits and features it is given. Outside autocast it costs one check.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])
AUTOCAST_DEVICES = ("cuda", "cpu")


def _to_fp32(value: Any) -> Any:
    if torch.is_tensor(value) and value.is_floating_point() and value.dtype != torch.float32:
        return value.float()
    if isinstance(value, (tuple, list)):
        return type(value)(_to_fp32(v) for v in value)
    return value


def active_autocast_devices() -> list[str]:
    """The device types whose autocast is on in this thread."""
    return [device for device in AUTOCAST_DEVICES if torch.is_autocast_enabled(device)]


def fp32_loss(fn: F) -> F:
    """Decorator: run `fn` with autocast off and its floating tensor arguments in fp32 (see module docstring)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        devices = active_autocast_devices()
        if not devices:
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for device in devices:
                stack.enter_context(torch.autocast(device_type=device, enabled=False))
            return fn(*_to_fp32(args), **{k: _to_fp32(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]
