"""Timing a row: its fresh data, distiller (random teacher weights) and trainer, warmed up, then `Trainer.train_step`
(the very step a run trains with) timed between two device synchronisations; the loader rows time their loader
alone. Profiling (profiling.py) runs the same `RowRun.step`."""

from __future__ import annotations

import contextlib
import gc
import tempfile
import time
from typing import Iterator

import torch

from ...dataset import uses_device_resident_data
from ...dataset.device_cifar import VIEWS_PER_IMAGE
from ...dataset.teacher_views import read_train_arrays
from ...distillers import get_distiller_class
from ...engine import accel
from ...engine.build import build_distiller, is_imagenet
from ...engine.run import step_trainer
from ...engine.teacher_cache import TeacherLogitTable, release_served_teacher
from ...engine.teacher_cache_build import build_zero_padded_cache
from ...engine.teacher_cache_identity import run_identity
from ...errors import MdistillerError
from ...rng import set_seed
from .data import DataSource
from .rows import Row


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, whose ops are synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warmup_steps(warmup: int | None, cfg, device: torch.device) -> int:
    """Untimed steps (--warmup, else the device's default): compilation, CUDA-graph capture, cudnn.benchmark's search
    and the allocator settle here."""
    cuda = device.type == "cuda"
    least = (50 if cuda else 5) if cfg.SOLVER.COMPILE else 1
    return max(warmup if warmup is not None else (30 if cuda else 3), least)


def loader_warmup_steps(warmup: int | None, device: torch.device) -> int:
    """Untimed batches of a loader row."""
    return max(warmup if warmup is not None else (5 if device.type == "cuda" else 2), 1)


# Images whose 162 views a teacher_cache row builds for real, timed (the build's views/s); the rest of its full-size
# table is zeros: the step's speed depends on the values no more than on the random teacher's weights.
CACHE_BUILD_IMAGES = {"cuda": 2000, "cpu": 2}


def cache_table(cfg, distiller, device: torch.device, stack: contextlib.ExitStack) -> tuple[TeacherLogitTable, dict]:
    """A teacher_cache row's table: the real build over the first CACHE_BUILD_IMAGES images of the bench's training
    set, under the row's precision, widened with zero rows to the whole set (the engine's build_zero_padded_cache);
    the teacher is then released as in a run (kept for the views it still runs on: MLKD's strong view). Returns the
    table and the build's figures."""
    images, labels = read_train_arrays(cfg)
    count = min(CACHE_BUILD_IMAGES[device.type], len(images))
    folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_cache_"))
    identity = run_identity(cfg, distiller.teacher, images[:count], labels[:count], device)
    path, full, built = build_zero_padded_cache(folder, distiller.teacher, images[:count], identity, device,
                                                len(images), channels_last=bool(cfg.SOLVER.CHANNELS_LAST),
                                                verify_samples=64, progress=False)
    live_views = release_served_teacher(cfg, distiller)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    figures = {"cache_build_views_per_s": built["views_per_s"], "cache_build_views": count * VIEWS_PER_IMAGE,
               "cache_verify_max_abs_diff": built["verify"]["max_abs_diff"]}
    return TeacherLogitTable(path, full, device, live_views), figures


class RowRun:
    """One row's fresh data, distiller and trainer; `step()` runs one real training step and returns its images."""

    def __init__(self, row: Row, cfg, data: DataSource, device: torch.device, stack: contextlib.ExitStack):
        self.row, self.cfg, self.device = row, cfg, device
        set_seed(cfg.EXPERIMENT.SEED)
        self.data = data.open(cfg, device)
        self.batches, self.epoch_images = self.data.stream, self.data.epoch_images
        run_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_run_"))
        distiller = build_distiller(cfg, self.data.num_classes, self.data.num_data, random_teacher=True)
        self.table, self.figures = None, {}
        if cfg.DISTILLER.TEACHER_CACHE:
            self.table, self.figures = cache_table(cfg, distiller, device, stack)
        self.trainer = step_trainer(cfg, distiller, device, run_dir, teacher_cache=self.table)
        self.trainer.distiller.train()
        # the state training keeps for an epoch: same statistics, non-finite watch, per-step LR and host reads
        self.epoch = self.trainer.epoch_progress(1, max(self.epoch_images // cfg.SOLVER.BATCH_SIZE, 1))
        self.steps = 0
        self.host_data_s = self.host_step_s = 0.0  # host time in next(batches) and in the step call

    def step(self) -> int:
        """Next batch, one Trainer.train_step (the very step train_epoch runs); the reference row also reads the loss on
        the host every step, as mdistiller's meters do."""
        started = time.perf_counter()
        batch = next(self.batches)
        loaded = time.perf_counter()
        self.steps += 1
        _, losses = self.trainer.train_step(batch, 1, self.steps, self.epoch)
        if self.row.sync_every_step:
            sum(term.mean() for term in losses.values()).item()
        self.host_data_s += loaded - started
        self.host_step_s += time.perf_counter() - loaded
        return len(batch["target"])

    def close(self) -> None:
        """Free everything the row built (workers, compiled graphs, cached device memory)."""
        self.data.close()
        del self.trainer, self.batches, self.data
        gc.collect()
        if self.cfg.SOLVER.COMPILE:
            torch._dynamo.reset()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


@contextlib.contextmanager
def warmed_up(row: Row, cfg, data: DataSource, device: torch.device, warmup: int) -> Iterator[RowRun]:
    """A row's run after `warmup` steps and a device synchronisation; closed (and freed) on exit."""
    with contextlib.ExitStack() as stack:
        run = RowRun(row, cfg, data, device, stack)
        try:
            for _ in range(warmup):
                run.step()
            synchronize(device)
            run.host_data_s = run.host_step_s = 0.0
            yield run
        finally:
            run.close()


def time_row(row: Row, cfg, data: DataSource, device: torch.device, steps: int, warmup: int) -> dict:
    """Build the row, run warm-up steps, then time `steps` steps between two device synchronisations."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with warmed_up(row, cfg, data, device, warmup) as run:
        started = time.perf_counter()
        images = sum(run.step() for _ in range(steps))
        synchronize(device)
        seconds = time.perf_counter() - started
        epoch_images, figures = run.epoch_images, run.figures
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    rate = images / seconds
    what = row.what
    if figures:
        what += (f"; cache build {figures['cache_build_views_per_s']:,.0f} views/s over "
                 f"{figures['cache_build_views']:,} views, the rest of the table zeros")
    return {"name": row.name, "what": what, "batch": cfg.SOLVER.BATCH_SIZE, "images_per_s": rate,
            "seconds_per_epoch": epoch_images / rate, "epoch_images": epoch_images, "peak_memory_mib": peak,
            "steps": steps, "warmup": warmup, "seconds": seconds, "switches": accel.describe(cfg),
            "data": data_path_of(cfg, device), "host_sync_every_step": row.sync_every_step, **figures}


def data_path_of(cfg, device: torch.device) -> str:
    """How a row's batches are made."""
    if is_imagenet(cfg.DATASET.TYPE):
        return "synthetic device tensors"
    cached = ", cached teacher logits" if cfg.DISTILLER.TEACHER_CACHE else ""
    if uses_device_resident_data(cfg, get_distiller_class(cfg.DISTILLER.TYPE).declares.train_views, device):
        return f"GPU-resident (augmented on the GPU){cached}"
    return f"DataLoader ({cfg.DATASET.NUM_WORKERS} workers, PIL transforms){cached}"


def time_loader_row(row: Row, cfg, data: DataSource, device: torch.device, steps: int, warmup: int) -> dict:
    """Iterate the row's training loader alone: `warmup` full batches, then `steps` timed ones."""
    set_seed(cfg.EXPERIMENT.SEED)
    try:
        batches = data.open(cfg, device)
    except MdistillerError as exc:
        raise MdistillerError(f"row {row.name}: {exc}") from None
    try:
        for _ in range(warmup):
            next(batches.stream)
        synchronize(device)
        started = time.perf_counter()
        images = sum(len(next(batches.stream)["target"]) for _ in range(steps))
        synchronize(device)
        seconds = time.perf_counter() - started
    finally:
        batches.close()
    on_device = batches.note.startswith("decode on")
    what = row.what + (" [CPU: the same path with device cpu]" if on_device and device.type != "cuda" else "")
    return {"name": row.name, "what": what, "batch": cfg.SOLVER.BATCH_SIZE, "workers": cfg.DATASET.NUM_WORKERS,
            "batches_per_s": steps / seconds, "images_per_s": images / seconds, "steps": steps, "warmup": warmup,
            "seconds": seconds, "image_size": cfg.DATASET.IMAGE_SIZE, "loader_only": True,
            "data": f"{data.describe()}; {batches.note}, {cfg.DATASET.NUM_WORKERS} workers"}
