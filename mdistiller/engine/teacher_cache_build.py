"""Building a teacher-output cache: the frozen teacher over all 162 views of every training image, in large batches,
under the run's precision (SOLVER.AMP's bf16 autocast, the device's TF32 setting, channels_last if asked), written
chunk by chunk; then a random sample of views is recomputed live, through torchvision's PIL ops, and compared.

A build writes `logits.partial` (the whole table's size, filled in chunks of CHUNK_IMAGES images, each fsynced) and
records the chunks done in `build.json` (atomically, after the chunk's bytes). A killed build started again with the
same plan continues at the first chunk not recorded; batches start at chunk boundaries, so it computes exactly the
batches an uninterrupted build computes and ends byte-identical to it (on the CPU; cuDNN may choose other algorithms
in another process). The finished table is renamed to `logits.bin` and `identity.json` is written last. One process
builds a folder at a time (a file lock); another one waiting for it then finds the cache done.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import time
from typing import ContextManager

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..dataset.device_cifar import VIEWS_PER_IMAGE
from ..dataset.teacher_views import pil_view, views_of
from ..download import file_lock
from ..errors import MdistillerError
from ..files import atomic_write_text, file_sha256
from ..log import get_logger
from .accel import AMP_DTYPE
from .teacher_cache_identity import (
    IDENTITY_FILE,
    PARTIAL_FILE,
    PROGRESS_FILE,
    STORAGE,
    TABLE_FILE,
    checked,
    difference,
    is_complete,
    read_identity,
    table_shape,
)

log = get_logger(__name__)

CHUNK_IMAGES = 500  # images per chunk (81,000 views): the unit a killed build loses at most
VERIFY_SAMPLES = 1024
VERIFY_BATCH = 64  # the training batch: another batch composition than the build's
LOCK_FILE = ".build.lock"


def default_batch_size(device) -> int:
    """Views per teacher forward of a build: large on CUDA, moderate on the CPU."""
    return 4096 if torch.device(device).type == "cuda" else 1296


def tolerance(identity: dict) -> float:
    """Largest |cached - live| the verification accepts, relative to max(1, largest |logit|): fp32 differs by the
    convolution algorithms' rounding only, TF32 and bf16 by their coarser rounding, fp16 storage adds its own."""
    tol = 1e-4
    if identity["tf32"]:
        tol = 1e-2
    if identity["amp"]:
        tol = 4e-2
    if identity["dtype"] == "fp16":
        tol += 2e-3
    return tol


def _precision(identity: dict, device: torch.device) -> ContextManager:
    if identity["amp"]:
        return torch.autocast(device_type=device.type, dtype=AMP_DTYPE)
    return contextlib.nullcontext()


def _logits(teacher: nn.Module, views: torch.Tensor, identity: dict, device: torch.device,
            memory_format: torch.memory_format) -> torch.Tensor:
    """The teacher's fp32-cast logits on a batch of normalised views, as the training step's teacher_forward runs."""
    with torch.inference_mode(), _precision(identity, device):
        return teacher(views.contiguous(memory_format=memory_format))[0].float()


def _plan(identity: dict, batch_size: int, chunk_images: int, channels_last: bool) -> dict:
    return {"identity": checked(identity), "batch_size": batch_size, "chunk_images": chunk_images,
            "channels_last": channels_last}


def _read_progress(path: str) -> dict | None:
    try:
        with open(os.path.join(path, PROGRESS_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def open_table_file(file: str, identity: dict) -> np.ndarray:
    """The table in `file` as a read-only (rows, classes) memory map; a file of the wrong size is a one-line error."""
    rows, classes = table_shape(identity)
    dtype = STORAGE[identity["dtype"]]
    expected = rows * classes * dtype.itemsize
    size = os.path.getsize(file)
    if size != expected:
        raise MdistillerError(f"teacher cache table {file} has {size} bytes, expected {expected} ({rows} views x "
                              f"{classes} classes in {identity['dtype']}): it is damaged; rebuild the cache")
    return np.memmap(file, dtype=dtype, mode="r", shape=(rows, classes))


def verify_table(table: np.ndarray, teacher: nn.Module, images: np.ndarray, identity: dict, device,
                 samples: int = VERIFY_SAMPLES, seed: int = 0, channels_last: bool = False) -> dict:
    """Recompute `samples` random views live (torchvision's PIL ops, batches of VERIFY_BATCH) and compare them with
    the table: the largest absolute difference, the largest |logit|, the tolerance and whether it passed."""
    device = torch.device(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    rows_total = table.shape[0]
    count = min(int(samples), rows_total)
    rows = np.random.default_rng(seed).choice(rows_total, size=count, replace=False)
    teacher = teacher.to(device, memory_format=memory_format).eval()
    live = []
    for start in range(0, count, VERIFY_BATCH):
        part = rows[start:start + VERIFY_BATCH]
        views = torch.stack([pil_view(images[r // VIEWS_PER_IMAGE], int(r % VIEWS_PER_IMAGE), identity["mean"],
                                      identity["std"]) for r in part])
        live.append(_logits(teacher, views.to(device), identity, device, memory_format).cpu())
    live_values = torch.cat(live).double().numpy()
    cached = np.asarray(table[np.sort(rows)], dtype=np.float64)[np.argsort(np.argsort(rows))]
    finite = bool(np.isfinite(cached).all())
    largest = float(np.abs(live_values).max()) if count else 0.0
    diff = float(np.abs(live_values - cached).max()) if count and finite else float("inf")
    limit = tolerance(identity) * max(1.0, largest)
    return {"samples": count, "seed": seed, "max_abs_diff": diff, "max_abs_logit": largest, "tolerance": limit,
            "passed": finite and diff <= limit}


def build_cache(path: str, teacher: nn.Module, images: np.ndarray, identity: dict, device, *,
                batch_size: int | None = None, chunk_images: int = CHUNK_IMAGES, channels_last: bool = False,
                verify_samples: int = VERIFY_SAMPLES, progress: bool = True, source: dict | None = None) -> dict:
    """Build (or finish, or find already built) the cache at `path` for `identity` from `teacher` and the uint8 HWC
    training `images`; returns the written identity. A folder holding a cache of another identity is refused."""
    device = torch.device(device)
    batch_size = int(batch_size or default_batch_size(device))
    if batch_size <= 0 or chunk_images <= 0:
        raise MdistillerError(f"the cache build's batch size ({batch_size}) and chunk ({chunk_images} images) must "
                              f"be positive")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise MdistillerError(f"cannot create the teacher cache folder {path}: {exc.strerror or exc}") from None
    with file_lock(os.path.join(path, LOCK_FILE), waiting=f"waiting for another process building {path}"):
        if is_complete(path):  # built meanwhile by another process, or earlier
            found = read_identity(path)
            why = difference(found, identity)
            if why is not None:
                raise MdistillerError(f"{path} holds a teacher cache of another {why}: choose another folder or delete "
                                      f"it")
            return found
        return _build_locked(path, teacher, images, identity, device, batch_size, chunk_images, channels_last,
                             verify_samples, progress, source or {})


def _build_locked(path: str, teacher: nn.Module, images: np.ndarray, identity: dict, device: torch.device,
                  batch_size: int, chunk_images: int, channels_last: bool, verify_samples: int, progress: bool,
                  source: dict) -> dict:
    rows_total, classes = table_shape(identity)
    if len(images) != identity["num_images"]:
        raise MdistillerError(f"{len(images)} training images for a cache of {identity['num_images']}")
    dtype = STORAGE[identity["dtype"]]
    partial, table_file = os.path.join(path, PARTIAL_FILE), os.path.join(path, TABLE_FILE)
    progress_file = os.path.join(path, PROGRESS_FILE)
    plan = _plan(identity, batch_size, chunk_images, channels_last)
    chunks = -(-identity["num_images"] // chunk_images)
    record = _read_progress(path)
    done = 0
    if record is not None and record.get("plan") == plan:
        if not os.path.isfile(partial) and os.path.isfile(table_file) and record.get("chunks_done") == chunks:
            os.replace(table_file, partial)  # killed between the rename and identity.json: finish it
        if os.path.isfile(partial) and os.path.getsize(partial) == rows_total * classes * dtype.itemsize:
            done = int(record.get("chunks_done", 0))
    if done:
        log.info(f"teacher cache {path}: continuing the build at chunk {done + 1} of {chunks}")
    else:
        with open(partial, "wb") as f:
            f.truncate(rows_total * classes * dtype.itemsize)
        atomic_write_text(progress_file, json.dumps({"plan": plan, "chunks_done": 0}))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    teacher = teacher.to(device, memory_format=memory_format).eval()
    on_device = torch.as_tensor(images).permute(0, 3, 1, 2).contiguous().to(device)
    mean = torch.tensor(identity["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(identity["std"], device=device).view(1, 3, 1, 1)
    row_bytes = classes * dtype.itemsize
    started, computed = time.perf_counter(), 0
    bar = tqdm(total=rows_total, initial=min(done * chunk_images, identity["num_images"]) * VIEWS_PER_IMAGE,
               unit="view", unit_scale=True, desc="teacher cache", dynamic_ncols=True, disable=not progress)
    fd = os.open(partial, os.O_RDWR)
    try:
        for chunk in range(done, chunks):
            first = chunk * chunk_images * VIEWS_PER_IMAGE
            last = min((chunk + 1) * chunk_images, identity["num_images"]) * VIEWS_PER_IMAGE
            parts = []
            for start in range(first, last, batch_size):
                rows = torch.arange(start, min(start + batch_size, last), device=device)
                views = views_of(on_device, rows, mean, std)
                parts.append(_logits(teacher, views, identity, device, memory_format).cpu())
                bar.update(len(rows))
            values = np.ascontiguousarray(torch.cat(parts).numpy(), dtype=dtype)
            os.pwrite(fd, values.tobytes(), first * row_bytes)
            os.fsync(fd)
            atomic_write_text(progress_file, json.dumps({"plan": plan, "chunks_done": chunk + 1}))
            computed += last - first
    finally:
        os.close(fd)
        bar.close()
    seconds = time.perf_counter() - started
    check = verify_table(open_table_file(partial, identity), teacher, images, identity, device, verify_samples,
                         channels_last=channels_last)
    if not check["passed"]:
        raise MdistillerError(
            f"teacher cache {path}: the verification found a difference of {check['max_abs_diff']:.3g} between cached "
            f"and live logits (tolerance {check['tolerance']:.3g}); the table was not published. Rebuild it, and "
            f"report this if it persists"
        )
    written = {
        **identity, "torch": torch.__version__, "device": _device_name(device),
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(seconds, 3), "views_per_s": round(computed / seconds, 1) if computed else None,
        "batch_size": batch_size, "chunk_images": chunk_images, "channels_last": channels_last,
        "verify": check, "table_sha256": file_sha256(partial), "source": source,
    }
    os.replace(partial, table_file)
    atomic_write_text(os.path.join(path, IDENTITY_FILE), json.dumps(written, indent=1) + "\n")
    os.remove(progress_file)
    return written


def build_zero_padded_cache(folder: str, teacher: nn.Module, images: np.ndarray, identity: dict, device,
                            num_images: int, **build_options) -> tuple[str, dict, dict]:
    """A table built for real (build_cache) over `images`, then widened with zero rows to `num_images` images, for
    timing a step that reads it (tools/bench.py: the step's speed depends on the values no more than on a random
    teacher's weights). Returns (the widened table's folder, its identity, the build's identity); the widened folder
    holds the table file alone, its identity goes to TeacherLogitTable directly."""
    built = build_cache(os.path.join(folder, "built"), teacher, images, identity, device, **build_options)
    full = {**built, "num_images": int(num_images)}
    widened = os.path.join(folder, "full")
    os.makedirs(widened, exist_ok=True)
    table_file = os.path.join(widened, TABLE_FILE)
    os.replace(os.path.join(folder, "built", TABLE_FILE), table_file)
    rows, classes = table_shape(full)
    with open(table_file, "r+b") as f:
        f.truncate(rows * classes * STORAGE[full["dtype"]].itemsize)  # sparse zeros
    return widened, full, built
