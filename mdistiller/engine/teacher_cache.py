"""The teacher-output cache (DISTILLER.TEACHER_CACHE): distil without running the teacher, exactly, on CIFAR.

Every training view of the CIFAR recipe is one of 162 (9 x 9 crop offsets x 2 flips of the zero-padded image), and a
frozen teacher in eval mode gives each view the same logits every time: computed once (teacher_cache_build.py), a
table lookup by (sample index, view id) equals the live teacher's output. The data path records each image's view id
(batch need "view_id"); the trainer adds the looked-up "teacher_logits" to the batch; a logit method then skips its
teacher forward (`Distiller.teacher_logits`), and the teacher is not even placed on the device.

Refused, with the reason, before any side effect (`cache_refusal`): a method that declares teacher features or a
train-mode teacher (`Declaration.teacher_reads`), a method none of whose teacher views can be enumerated (ImageNet's
crops, Tiny-ImageNet's rotation, DATASET.AUGMENT), DATASET.MIXUP's mixed images, a run without a teacher. MLKD takes
its weak (standard) view's logits from the cache and keeps the live teacher for its strong view only (`cache_plan`).
A cache whose identity (teacher_cache_identity.py) differs from the run's in anything that changes the teacher's
output is refused naming the difference, once the teacher and the data are read (still before the run folder exists).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..dataset.device_cifar import VIEWS_PER_IMAGE
from ..dataset.mixing import mixing_enabled
from ..dataset.teacher_views import loader_arrays, read_train_arrays, view_refusal
from ..distillers._base import FEATURES, LOGITS, TRAIN_MODE
from ..errors import MdistillerError
from ..log import get_logger
from .build import build_teacher
from .teacher_cache_build import VERIFY_SAMPLES, build_cache, default_batch_size, open_table_file
from .teacher_cache_identity import (
    AUTO,
    RECIPE_FIELDS,
    TABLE_FILE,
    cache_path,
    is_complete,
    read_identity,
    recipe_identity,
    refuse_if_different,
    run_identity,
)

log = get_logger(__name__)

GPU_SHARE = 0.5  # the table goes on the GPU when it takes at most this share of the free GPU memory
COPY_ROWS = 1 << 20  # rows copied at a time from the memory map to the GPU or pinned memory


def cache_plan(cfg, distiller_class) -> tuple[str | None, str | None, tuple[str, ...]]:
    """(why DISTILLER.TEACHER_CACHE cannot serve this config, in one line, or None; the training view whose teacher
    logits the cache serves; the views the teacher still runs on live), from the config alone.

    A logit view that cannot be enumerated (MLKD's strong view) keeps its live teacher beside a served view: the
    cached rows equal the live teacher's on the served view, so the run is the live run."""
    name = cfg.DISTILLER.TYPE
    prefix = "DISTILLER.TEACHER_CACHE is set, but"
    declares = distiller_class.declares
    if not declares.requires_teacher:
        return f"{prefix} DISTILLER.TYPE {name} trains without a teacher: set DISTILLER.TEACHER_CACHE ''", None, ()
    if cfg.DATASET.AUGMENT:
        return (f"{prefix} DATASET.AUGMENT {cfg.DATASET.AUGMENT} replaces the crop + flip view, whose 162 views per "
                f"image are what a cache enumerates: set DISTILLER.TEACHER_CACHE '' or DATASET.AUGMENT ''", None, ())
    if mixing_enabled(cfg):
        return (f"{prefix} DATASET.MIXUP mixes pairs of images, which are none of the 162 views a cache enumerates: "
                f"set DISTILLER.TEACHER_CACHE '' or the DATASET.MIXUP values to 0", None, ())
    served, live, unenumerable = [], [], None
    for key, uses in declares.teacher_uses(distiller_class.hparams(cfg)).items():
        if TRAIN_MODE in uses:
            return (f"{prefix} {name} runs its teacher in train mode (its BN statistics move, so its outputs are not "
                    f"fixed): set DISTILLER.TEACHER_CACHE ''", None, ())
        if FEATURES in uses:
            return (f"{prefix} {name} uses the teacher's features, and a cache holds logits only: set "
                    f"DISTILLER.TEACHER_CACHE ''", None, ())
        if LOGITS not in uses:
            continue
        reason = view_refusal(cfg.DATASET.TYPE, declares.train_views.get(key, "standard"))
        if reason:
            live.append(key)
            unenumerable = unenumerable or (f"{prefix} {name}'s teacher reads its {key} view, which cannot be "
                                            f"enumerated ({reason}): set DISTILLER.TEACHER_CACHE ''")
        else:
            served.append(key)
    if not served:
        return (unenumerable or f"{prefix} {name} reads no teacher logits on the standard view: set "
                                f"DISTILLER.TEACHER_CACHE ''"), None, ()
    if len(served) > 1:
        return (f"{prefix} {name}'s teacher reads {len(served)} enumerable views ({', '.join(served)}) and a batch "
                f"carries one view's cached logits: set DISTILLER.TEACHER_CACHE ''", None, ())
    return None, served[0], tuple(live)


def cache_refusal(cfg, distiller_class) -> str | None:
    """Why DISTILLER.TEACHER_CACHE cannot serve this config (one line), or None; from the config alone."""
    if not cfg.DISTILLER.TEACHER_CACHE:
        return None
    return cache_plan(cfg, distiller_class)[0]


def cache_batch_needs(cfg, distiller_class) -> dict[str, object]:
    """The batch need the cache adds to the distiller's: the view ids of the view whose logits it serves."""
    if not cfg.DISTILLER.TEACHER_CACHE:
        return {}
    refusal, served, _ = cache_plan(cfg, distiller_class)
    if refusal:
        raise MdistillerError(refusal)
    return {"view_id": served}


def check_cache_files(cfg, device) -> None:
    """A cache folder named in DISTILLER.TEACHER_CACHE exists, is finished and was built for this config's teacher
    architecture, data set, normalisation, views, dtype and precision (the hashes are checked once read)."""
    if cfg.DISTILLER.TEACHER_CACHE in ("", AUTO):
        return
    path = cache_path(cfg, {})
    expected = recipe_identity(cfg, device)
    refuse_if_different(path, read_identity(path), expected, RECIPE_FIELDS)


class TeacherLogitTable:
    """A finished cache's table where the run's device reads it fastest: on the GPU when it fits (GPU_SHARE of the
    free memory), else in pinned host memory, else memory-mapped (always memory-mapped for a CPU run: the page cache
    holds it). `attach(batch)` adds the batch's "teacher_logits" (fp32, on the device)."""

    def __init__(self, path: str, identity: dict, device, live_views: tuple[str, ...] = ()):
        self.path, self.identity, self.device = path, identity, torch.device(device)
        self.live_views = live_views
        mapped = open_table_file(f"{path}/{TABLE_FILE}", identity)
        self.table, self.where = self._place(mapped)

    def _place(self, mapped: np.ndarray) -> tuple[torch.Tensor, str]:
        # np.memmap's read-only pages cannot back a tensor without a warning: open a private (copy-on-write) map
        writable = np.memmap(mapped.filename, dtype=mapped.dtype, mode="c", shape=mapped.shape)
        source = torch.from_numpy(writable)
        if self.device.type != "cuda":
            return source, "memory-mapped"
        if source.nbytes <= GPU_SHARE * torch.cuda.mem_get_info(self.device)[0]:
            return self._copy(source, torch.empty(source.shape, dtype=source.dtype, device=self.device)), "on the GPU"
        try:
            pinned = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
        except RuntimeError:
            return source, "memory-mapped (too large for the GPU and for pinned memory)"
        return self._copy(source, pinned), "in pinned host memory (too large for the GPU)"

    @staticmethod
    def _copy(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        for start in range(0, source.shape[0], COPY_ROWS):
            target[start:start + COPY_ROWS].copy_(source[start:start + COPY_ROWS])
        return target

    @property
    def nbytes(self) -> int:
        """The table's size in bytes."""
        return self.table.nbytes

    def lookup(self, index: torch.Tensor, view_id: torch.Tensor) -> torch.Tensor:
        """fp32 logits (B, C) on the run's device of the views `view_id` of the training images `index`."""
        where = self.table.device
        rows = index.to(where, non_blocking=True).long() * VIEWS_PER_IMAGE + view_id.to(where, non_blocking=True)
        return self.table.index_select(0, rows).to(self.device, non_blocking=True).float()

    def attach(self, batch: dict) -> dict:
        """The batch with its "teacher_logits" (from its "index" and "view_id")."""
        if "view_id" not in batch:
            raise MdistillerError("a training batch without view ids reached the teacher cache: the data path must "
                                  "serve the batch need view_id")
        return {**batch, "teacher_logits": self.lookup(batch["index"], batch["view_id"])}

    def describe(self) -> str:
        """Where the table is and what it holds, for the log."""
        teacher = (f"the teacher runs on {', '.join(self.live_views)} only" if self.live_views
                   else "the teacher is not run")
        return (f"teacher logits from the cache {self.path} ({self.identity['dtype']}, {self.nbytes / 2**30:.2f} "
                f"GiB, {self.where}); {teacher}")


def release_served_teacher(cfg, distiller: nn.Module) -> tuple[str, ...]:
    """Drop the teacher from the distiller when the cache serves all it reads (its weights then never reach the
    device); returns the views it still runs on (MLKD's strong view), for which it stays."""
    live_views = cache_plan(cfg, type(distiller))[2]
    if not live_views:
        distiller.teacher = None
    return live_views


def prepare_teacher_cache(cfg, distiller: nn.Module, train_loader, device) -> TeacherLogitTable | None:
    """The run's table (None when DISTILLER.TEACHER_CACHE is off): the identity of the built teacher and the loaded
    training set, the cache found (auto: built first when missing) and checked, then the teacher released."""
    if not cfg.DISTILLER.TEACHER_CACHE:
        return None
    images, labels = loader_arrays(train_loader)
    identity = run_identity(cfg, distiller.teacher, images, labels, device)
    path = cache_path(cfg, identity)
    if cfg.DISTILLER.TEACHER_CACHE == AUTO and not is_complete(path):
        if distributed.world_size() > 1:
            raise MdistillerError(f"no teacher cache at {path} yet: under torchrun build it first, in one process: "
                                  f"python tools/cache_teacher.py --cfg <this run's config>")
        log.info(f"building the teacher cache {path} ({identity['num_images']} x {VIEWS_PER_IMAGE} views)")
        build_cache(path, distiller.teacher, images, identity, device, batch_size=default_batch_size(device),
                    channels_last=bool(cfg.SOLVER.CHANNELS_LAST), source=_source(cfg))
        distiller.teacher.cpu()  # the build placed it on the device; it is released below
    refuse_if_different(path, read_identity(path), identity)
    table = TeacherLogitTable(path, identity, device, release_served_teacher(cfg, distiller))
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return table


def _source(cfg) -> dict:
    """Where a build read its teacher and data (recorded in identity.json; `--verify` reads them back)."""
    return {"teacher": cfg.DISTILLER.TEACHER, "teacher_ckpt": cfg.DISTILLER.TEACHER_CKPT,
            "dataset": cfg.DATASET.TYPE, "data_root": cfg.DATASET.ROOT, "amp": bool(cfg.SOLVER.AMP),
            "dtype": cfg.DISTILLER.TEACHER_CACHE_DTYPE}


def ensure_teacher_cache(cfg, device=None, batch_size: int | None = None, progress: bool = True,
                         verify_samples: int = VERIFY_SAMPLES) -> str:
    """The cache folder for cfg's teacher and data (DISTILLER.TEACHER_CACHE's path, or the `auto` one when it is
    "auto" or empty), built first when missing: for tools/cache_teacher.py, and for sweeps that build it once before
    their students start (each student then finds it with DISTILLER.TEACHER_CACHE auto)."""
    device = torch.device(device) if device is not None else distributed.device()
    auto = cfg.clone()
    auto.defrost()
    if not auto.DISTILLER.TEACHER_CACHE:
        auto.DISTILLER.TEACHER_CACHE = AUTO
    auto.freeze()
    images, labels = read_train_arrays(auto)
    teacher = build_teacher(auto, recipe_identity(auto, device)["num_classes"])
    identity = run_identity(auto, teacher, images, labels, device)
    path = cache_path(auto, identity)
    if is_complete(path):
        refuse_if_different(path, read_identity(path), identity)
        return path
    build_cache(path, teacher, images, identity, device, batch_size=batch_size,
                channels_last=bool(auto.SOLVER.CHANNELS_LAST), verify_samples=verify_samples, progress=progress,
                source=_source(auto))
    return path
