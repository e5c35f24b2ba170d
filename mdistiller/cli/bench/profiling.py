"""`--profile ROW DIR`: ~20 profiled steps of one row, through the same `RowRun.step` the timing runs."""

from __future__ import annotations

import os
import time

import torch

from .data import DataSource
from .rows import Row
from .timing import synchronize, warmed_up

PROFILE_STEPS = 20


def _self_device_us(event) -> float:
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def profile_row(row: Row, cfg, data: DataSource, device: torch.device, warmup: int, folder: str) -> None:
    """PROFILE_STEPS profiled steps of `row` after warm-up: a Chrome trace in `folder` and a printed summary of what
    limits speed (top kernels or ops, host time in data loading and in dispatch, device busy time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with warmed_up(row, cfg, data, device, warmup) as run:
        with profile(activities=activities) as prof:
            started = time.perf_counter()
            for _ in range(PROFILE_STEPS):
                run.step()
            synchronize(device)
            wall = time.perf_counter() - started
        data_s, step_s = run.host_data_s, run.host_step_s
    os.makedirs(folder, exist_ok=True)
    trace = os.path.join(folder, f"{row.name}.trace.json")
    prof.export_chrome_trace(trace)
    averages = prof.key_averages()
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(averages.table(sort_by=sort_by, row_limit=15))
    per_step = 1000.0 / PROFILE_STEPS
    print(f"profile of row {row.name} ({row.what}), {PROFILE_STEPS} steps, batch {cfg.SOLVER.BATCH_SIZE}:")
    print(f"  wall {wall * per_step:.2f} ms/step; host: next batch {data_s * per_step:.2f} ms/step, "
          f"train_step call {step_s * per_step:.2f} ms/step (enqueue on CUDA, compute on CPU)")
    if device.type == "cuda":
        busy = sum(_self_device_us(e) for e in averages) / 1000.0 / PROFILE_STEPS
        print(f"  GPU kernels {busy:.2f} ms/step: busy {100 * busy / (wall * per_step):.0f}% of the wall time "
              "(well below 100%: launch- or host-bound, where CUDA graphs / compile / a larger batch help)")
    print(f"  trace: {trace} (open in chrome://tracing or https://ui.perfetto.dev)")
