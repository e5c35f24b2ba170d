"""Throughput of the training step: mdistiller's pipeline against ours and each speed switch, timed in one process.

    python tools/bench.py [--cfg configs/cifar100/kd/resnet32x4_resnet8x4.yaml] [--rows reference,ours,amp,...]
        [--device cuda|cpu] [--tiny] [--steps N] [--warmup N] [--data auto|real|synthetic] [--synthetic-size N]
        [--large-cfg PATH] [--json PATH] [--markdown] [--profile ROW DIR] [--opts KEY VALUE ...]
    python tools/bench.py --methods kd,dkd,fitnet,crd,kd+dot [--pair resnet32x4_resnet8x4] [--rows ours] ...

Every row builds a fresh distiller (same seed, teacher with random weights: speed does not depend on them), its own
loaders from the real data code (`get_dataset`) and a `Trainer`, and times `Trainer.train_step` on full batches:
warm-up steps first, then `--steps` steps between two device synchronisations. Images/s counts the images trained;
s/epoch is the training-set size (the full 50,000 of CIFAR when the data are synthetic) over images/s.

The rows teacher_cache and teacher_cache_combined serve the teacher's logits from a table (DISTILLER.TEACHER_CACHE):
each builds the table for real over the first CACHE_BUILD_IMAGES training images (timed: the build's views/s, with its
verification), leaves the rest of the full-size table zero (speed does not depend on the values), and releases the
teacher as a run does.

With an ImageNet config (DATASET.TYPE imagenet) the batches are synthetic device tensors of the config's batch and
DATASET.IMAGE_SIZE: the step alone is timed, not the JPEG pipeline. The rows loader_pil and loader_gpu_decode time
that pipeline alone (no training step): the training DataLoader with PIL decoding in the workers, and with
DATASET.GPU_DECODE (batched decode_jpeg + crop/resize/flip on the device; on the CPU the same path runs with device
cpu). They read DATASET.ROOT's imagenet/ folder, or 500x375 JPEGs of 10 classes the bench writes to a temp folder.

Per-method mode (`--methods`): one row (`ours` unless --rows names another) timed for each method's config, KD's
first, and each method's step time relative to KD's, beside the DKD paper's ratio where it published one. A method
is a config file, or a name: `<name>` is configs/cifar100/<name>/<pair>.yaml, `kd+dot` (or `dot`) the KD+DOT config.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from ..dataset import check_batch_needs, get_dataset, shutdown_workers, uses_device_resident_data
from ..dataset.cifar import CIFAR_FORMATS
from ..dataset.cifar_files import write_cifar
from ..dataset.contrastive import ContrastiveSampler
from ..dataset.device_cifar import VIEWS_PER_IMAGE
from ..dataset.imagenet import DECODE_ON_CPU_ENV, ImageNetJpegFolder
from ..dataset.teacher_views import read_train_arrays
from ..distillers import get_distiller_class
from ..engine import accel
from ..engine.build import build_kwargs, build_model, is_imagenet
from ..engine.cfg import load_cfg
from ..engine.dot import DOT_TRAINERS
from ..engine.run import check_fits_data, default_device
from ..engine.teacher_cache import TeacherLogitTable, cache_batch_needs, release_served_teacher
from ..engine.teacher_cache_build import build_cache
from ..engine.teacher_cache_identity import STORAGE, TABLE_FILE, run_identity, table_shape
from ..engine.trainer import Trainer
from ..engine.validate import check_recipe, check_writable
from ..errors import MdistillerError
from ..files import resolve_project_path
from ..rng import set_seed
from . import run_cli

DEFAULT_PAIR = "resnet32x4_resnet8x4"
DEFAULT_CFG = f"configs/cifar100/kd/{DEFAULT_PAIR}.yaml"
DEFAULT_LARGE_CFG = "configs/cifar100/kd/fast/resnet32x4_resnet8x4.yaml"
# What the large-batch config holds, for a checkout that lacks the file
LARGE_BATCH_OPTS = ("SOLVER.BATCH_SIZE", "512", "SOLVER.LR", "0.4", "SOLVER.LR_WARMUP_EPOCHS", "5",
                    "SOLVER.AMP", "True", "SOLVER.CHANNELS_LAST", "True", "SOLVER.COMPILE", "default")
TINY_CIFAR_OPTS = ("DISTILLER.TEACHER", "resnet20", "DISTILLER.STUDENT", "resnet8")
TINY_IMAGENET_OPTS = ("DATASET.IMAGE_SIZE", "32", "SOLVER.BATCH_SIZE", "4")
FULL_TRAIN_SIZE = {"cifar100": 50_000, "cifar10": 50_000, "imagenet": 1_281_167}
PROFILE_STEPS = 20


def _switches(amp: bool = False, channels_last: bool = False, compile_mode: str = "") -> tuple[str, ...]:
    return ("SOLVER.AMP", str(amp), "SOLVER.CHANNELS_LAST", str(channels_last), "SOLVER.COMPILE", compile_mode)


@dataclass(frozen=True)
class Row:
    """One configuration to time: overrides on the base config, and whether the host reads the loss every step."""

    name: str
    what: str
    opts: tuple[str, ...] = ()
    sync_every_step: bool = False
    large_batch: bool = False  # built from the large-batch config instead of --cfg
    loader_only: bool = False  # times the ImageNet training loader alone, no training step


_RESIDENT = ("DATASET.DEVICE_RESIDENT", "True")
_CACHE = ("DISTILLER.TEACHER_CACHE", "auto")  # the rows build their own table (see cache_table)
ROWS = {row.name: row for row in (
    Row("reference", "mdistiller's step: fp32, loss.item() every step (its meters' host sync)",
        ("DATASET.DEVICE_RESIDENT", "False", "DATASET.NUM_WORKERS", "2", *_switches()), sync_every_step=True),
    Row("ours", "our default: fp32, no host sync per step", (*_RESIDENT, *_switches())),
    Row("amp", "ours + SOLVER.AMP (bf16 autocast)", (*_RESIDENT, *_switches(amp=True))),
    Row("channels_last", "ours + SOLVER.CHANNELS_LAST", (*_RESIDENT, *_switches(channels_last=True))),
    Row("amp_channels_last", "ours + AMP + channels_last", (*_RESIDENT, *_switches(True, True))),
    Row("compile", "ours + SOLVER.COMPILE default", (*_RESIDENT, *_switches(compile_mode="default"))),
    Row("cuda_graphs", "ours + SOLVER.COMPILE reduce-overhead (CUDA graphs on CUDA)",
        (*_RESIDENT, *_switches(compile_mode="reduce-overhead"))),
    Row("combined", "ours + AMP + channels_last + compile default", (*_RESIDENT, *_switches(True, True, "default"))),
    Row("large_batch", "the large-batch config (batch 512, LR 0.4 with warm-up, AMP, channels_last, compile)",
        large_batch=True),
    Row("teacher_cache", "ours + DISTILLER.TEACHER_CACHE (teacher logits looked up, the teacher not run)",
        (*_RESIDENT, *_switches(), *_CACHE)),
    Row("teacher_cache_combined", "ours + AMP + channels_last + compile default + DISTILLER.TEACHER_CACHE",
        (*_RESIDENT, *_switches(True, True, "default"), *_CACHE)),
    Row("loader_pil", "loader alone: JPEGs decoded, cropped and flipped by PIL in the DataLoader workers",
        ("DATASET.GPU_DECODE", "False"), loader_only=True),
    Row("loader_gpu_decode", "loader alone: DATASET.GPU_DECODE (workers read bytes; batched decode_jpeg, crop, resize, "
        "flip on the device)", ("DATASET.GPU_DECODE", "True"), loader_only=True),
)}
LOADER_ROWS = tuple(name for name, row in ROWS.items() if row.loader_only)
DEFAULT_ROWS = {
    ("cifar", "cuda"): ("reference", "ours", "amp", "channels_last", "compile", "cuda_graphs", "combined",
                        "large_batch", "teacher_cache", "teacher_cache_combined"),
    ("cifar", "cpu"): ("reference", "ours", "amp", "channels_last", "teacher_cache"),
    ("imagenet", "cuda"): ("reference", "ours", "amp", "amp_channels_last", *LOADER_ROWS),
    ("imagenet", "cpu"): ("reference", "ours", "amp", "amp_channels_last"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser("bench.py", description="training-step throughput: mdistiller's pipeline vs ours")
    parser.add_argument("--cfg", default=None,
                        help=f"YAML config (CIFAR, or ImageNet for synthetic tensors; default {DEFAULT_CFG})")
    parser.add_argument("--methods", default="",
                        help="per-method mode: comma-separated config files or names (kd, dkd, fitnet, crd, kd+dot, "
                             "...: configs/cifar100/<name>/<pair>.yaml), each timed in one row against KD")
    parser.add_argument("--pair", default=DEFAULT_PAIR,
                        help=f"the teacher_student file name of --methods names (default {DEFAULT_PAIR})")
    parser.add_argument("--rows", default="", help=f"comma-separated rows, of: {', '.join(ROWS)}")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: CUDA when present")
    parser.add_argument("--tiny", action="store_true",
                        help="small models: resnet20 -> resnet8 on CIFAR; 32x32 images, batch 4 on ImageNet")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 200 on CUDA, 20 on CPU)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default 30 on CUDA, 3 on CPU; compile rows at least 50 / 5)")
    parser.add_argument("--data", choices=("auto", "real", "synthetic"), default="auto",
                        help="CIFAR files under DATASET.ROOT (real), random images in a temp folder (synthetic), or "
                             "real when present (auto)")
    parser.add_argument("--synthetic-size", type=int, default=50_000, help="training images of the synthetic set")
    parser.add_argument("--large-cfg", default=None, help=f"the large_batch row's config (default {DEFAULT_LARGE_CFG})")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--markdown", action="store_true", help="also print the table in Markdown")
    parser.add_argument("--profile", nargs=2, default=None, metavar=("ROW", "DIR"),
                        help=f"instead of the table: a torch.profiler trace of {PROFILE_STEPS} steps of ROW in DIR")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="KEY VALUE overrides for every row, large_batch included (give them last)")
    return parser.parse_args(argv)


# ---- configs ----
def _load(path: str, opts: list[str]):
    cfg = load_cfg(path, opts)
    check_recipe(cfg)
    cfg.freeze()
    return cfg


def family_of(cfg) -> str:
    """"imagenet" (synthetic device tensors) or "cifar" (the real loaders)."""
    if is_imagenet(cfg.DATASET.TYPE):
        return "imagenet"
    if cfg.DATASET.TYPE not in CIFAR_FORMATS:
        raise MdistillerError(f"bench.py times CIFAR or ImageNet configs; DATASET.TYPE is {cfg.DATASET.TYPE!r}")
    return "cifar"


def select_rows(text: str, family: str, device: torch.device) -> list[Row]:
    """The rows named in --rows (default: the table of this family and device); unknown names are an error."""
    names = [n.strip() for n in text.split(",") if n.strip()] or list(DEFAULT_ROWS[(family, device.type)])
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise MdistillerError(f"unknown row {unknown[0]!r}; rows: {', '.join(ROWS)}")
    if family != "imagenet" and any(ROWS[n].loader_only for n in names):
        raise MdistillerError(f"rows {', '.join(LOADER_ROWS)} time the ImageNet JPEG pipeline: give an ImageNet --cfg")
    if family == "imagenet" and "large_batch" in names:
        raise MdistillerError("row large_batch is the CIFAR large-batch config; an ImageNet bench sets its batch "
                              "with --opts SOLVER.BATCH_SIZE")
    if len(set(names)) != len(names):
        raise MdistillerError(f"--rows names a row twice: {','.join(names)}")
    return [ROWS[n] for n in names]


def large_batch_file(args: argparse.Namespace) -> str | None:
    """The large_batch row's config file; None when the default one is missing (then --cfg + LARGE_BATCH_OPTS)."""
    if args.large_cfg is not None:
        return args.large_cfg  # a missing --large-cfg is an error, reported by load_cfg
    return DEFAULT_LARGE_CFG if os.path.isfile(DEFAULT_LARGE_CFG) else None


def large_batch_source(args: argparse.Namespace) -> str:
    """Where the large_batch row's config comes from, for the legend."""
    path = large_batch_file(args)
    return path or f"{args.cfg} + {' '.join(LARGE_BATCH_OPTS)} ({DEFAULT_LARGE_CFG} is missing)"


def row_cfg(args: argparse.Namespace, row: Row, base_opts: list[str]):
    """The frozen config of one row: its config file, the bench's and the user's overrides, the row's switches."""
    if not row.large_batch:
        return _load(args.cfg, [*base_opts, *row.opts])
    path = large_batch_file(args)
    return _load(path, base_opts) if path else _load(args.cfg, [*LARGE_BATCH_OPTS, *base_opts])


# ---- data ----
class CifarData:
    """The CIFAR files every row reads: the real ones under DATASET.ROOT, or random images written to a temp folder."""

    def __init__(self, cfg, choice: str, synthetic_size: int, stack: contextlib.ExitStack):
        fmt = CIFAR_FORMATS[cfg.DATASET.TYPE]
        present = os.path.isdir(os.path.join(cfg.DATASET.ROOT, fmt.folder))
        if choice == "real" and not present:
            raise MdistillerError(f"--data real: no {fmt.folder} folder under DATASET.ROOT {cfg.DATASET.ROOT}")
        self.synthetic = choice == "synthetic" or not present
        self.root = cfg.DATASET.ROOT
        if self.synthetic:
            if synthetic_size <= 0:
                raise MdistillerError(f"--synthetic-size must be positive, got {synthetic_size}")
            self.root = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_cifar_"))
            write_cifar(cfg.DATASET.TYPE, self.root, synthetic_size, n_test=min(synthetic_size, 1000), seed=0,
                        learnable=False)
        self.epoch_images = FULL_TRAIN_SIZE[cfg.DATASET.TYPE] if self.synthetic else None

    def describe(self) -> str:
        """Where the images come from, for the header."""
        return "synthetic (random uint8 images in cifar-100-python format)" if self.synthetic else f"{self.root}"

    def opts(self) -> list[str]:
        """The override that points every row at these files."""
        return ["DATASET.ROOT", self.root]

    def open(self, cfg, device: torch.device) -> tuple[Iterator[dict], int, int, int, Callable[[], None]]:
        """(endless iterator of full training batches, epoch size, training-set size, class count, close) for one
        row; the batches carry what the distiller's batch_needs ask for."""
        distiller_class = get_distiller_class(cfg.DISTILLER.TYPE)
        train_loader, _, num_train, num_classes = get_dataset(cfg, distiller_class.declares.train_views,
                                                              seed=cfg.EXPERIMENT.SEED, device=device,
                                                              needs={**distiller_class.batch_needs_of(cfg),
                                                                     **cache_batch_needs(cfg, distiller_class)})
        check_fits_data(cfg, num_train)
        batches = _full_batches(train_loader, cfg.SOLVER.BATCH_SIZE)

        def close() -> None:
            batches.close()
            shutdown_workers(train_loader)

        return batches, self.epoch_images or num_train, num_train, num_classes, close


def _full_batches(loader, batch_size: int) -> Iterator[dict]:
    # The partial last batch of an epoch is loaded but not trained on: under torch.compile its new shape means a
    # recompilation (once per run in training), which a steady-state figure must not include.
    while True:
        for batch in loader:
            if len(batch["target"]) == batch_size:
                yield batch


class ImageNetData:
    """Synthetic ImageNet-shaped batches already on the device: the step alone is timed, not the JPEG pipeline."""

    epoch_images = FULL_TRAIN_SIZE["imagenet"]
    synthetic = True

    def describe(self) -> str:
        """Where the images come from, for the header."""
        return "synthetic ImageNet-shaped device tensors (no data loading timed)"

    def opts(self) -> list[str]:
        """No override: the files are never read."""
        return []

    def open(self, cfg, device: torch.device) -> tuple[Iterator[dict], int, int, int, Callable[[], None]]:
        """(endless iterator of device batches, epoch size, training-set size, class count, close) for one row; a
        "contrastive_index" need is drawn as the ImageNet folder draws it (over the full training-set size)."""
        num_classes = cfg.DATASET.NUM_CLASSES or 1000
        distiller_class = get_distiller_class(cfg.DISTILLER.TYPE)
        needs = distiller_class.batch_needs_of(cfg)
        check_batch_needs(needs)
        size, batch = cfg.DATASET.IMAGE_SIZE, cfg.SOLVER.BATCH_SIZE
        generator = torch.Generator(device=device)
        generator.manual_seed(cfg.EXPERIMENT.SEED)
        sampler = None
        if "contrastive_index" in needs:
            spec = needs["contrastive_index"]
            labels = torch.arange(self.epoch_images, device=device) % num_classes
            sampler = ContrastiveSampler(labels, spec["k"], spec.get("mode", "exact"), replacement="always")
        pool = []
        for _ in range(2):
            item = {key: torch.randn(batch, 3, size, size, generator=generator, device=device)
                    for key in distiller_class.declares.train_views}
            item["target"] = torch.randint(0, num_classes, (batch,), generator=generator, device=device)
            item["index"] = torch.arange(batch, device=device)
            if sampler is not None:
                item["contrastive_index"] = sampler.draw(item["index"], item["index"] % num_classes, generator)
            pool.append(item)
        return itertools.cycle(pool), self.epoch_images, self.epoch_images, num_classes, lambda: None


class JpegFolderData:
    """The ImageNet folder the loader rows read: DATASET.ROOT's, or synthetic 500x375 JPEGs written to a temp folder."""

    def __init__(self, cfg, stack: contextlib.ExitStack, classes: int = 10):
        present = all(os.path.isdir(os.path.join(cfg.DATASET.ROOT, "imagenet", split)) for split in ("train", "val"))
        self.synthetic = not present
        self.root = cfg.DATASET.ROOT
        if self.synthetic:
            self.root = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_imagenet_"))
            self.per_class = min(max(4 * cfg.SOLVER.BATCH_SIZE // classes, 8), 200)
            write_jpeg_folder(self.root, classes, self.per_class)
            self.classes = classes

    def describe(self) -> str:
        """Where the JPEGs come from, for the legend."""
        if self.synthetic:
            return f"{self.classes * self.per_class} synthetic 500x375 JPEGs (quality 90, 10 classes) in a temp folder"
        return os.path.join(self.root, "imagenet", "train")

    def opts(self) -> list[str]:
        """Overrides that point a loader row at this folder (whose class count may not be the config's)."""
        return ["DATASET.ROOT", self.root, "DATASET.NUM_CLASSES", "0"]


def write_jpeg_folder(root: str, classes: int, per_class: int, width: int = 500, height: int = 375) -> None:
    """`root/imagenet/{train,val}/<class>/*.JPEG`: smooth gradients plus mild noise, ImageNet-like file sizes."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    for split, count in (("train", per_class), ("val", 1)):
        for c in range(classes):
            folder = os.path.join(root, "imagenet", split, f"n{c:08d}")
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                a, b = rng.uniform(0.2, 3.0, 2)
                base = np.stack([xx * a, yy * b, (xx + yy) * (a + b) / 4], -1) + rng.uniform(0, 255, 3)
                pixels = np.clip(base % 256 + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"n{c:08d}_{i}.JPEG"), quality=90)


@contextlib.contextmanager
def _decode_on(device: torch.device, cfg) -> Iterator[None]:
    """On the CPU, let DATASET.GPU_DECODE run its path with device cpu (it needs CUDA otherwise)."""
    force = device.type != "cuda" and cfg.DATASET.GPU_DECODE
    old = os.environ.get(DECODE_ON_CPU_ENV)
    if force:
        os.environ[DECODE_ON_CPU_ENV] = "1"
    try:
        yield
    finally:
        if force:
            if old is None:
                os.environ.pop(DECODE_ON_CPU_ENV, None)
            else:
                os.environ[DECODE_ON_CPU_ENV] = old


def time_loader_row(row: Row, cfg, data: JpegFolderData, device: torch.device, steps: int, warmup: int) -> dict:
    """Iterate the row's training loader alone: `warmup` full batches, then `steps` timed ones."""
    views = get_distiller_class(cfg.DISTILLER.TYPE).declares.train_views
    set_seed(cfg.EXPERIMENT.SEED)
    with _decode_on(device, cfg), contextlib.redirect_stdout(sys.stderr):  # the loader's one-line notes
        train_loader, _, num_train, _ = get_dataset(cfg, views, seed=cfg.EXPERIMENT.SEED, device=device)
    on_device = isinstance(train_loader.dataset, ImageNetJpegFolder)
    if bool(cfg.DATASET.GPU_DECODE) != on_device:
        raise MdistillerError(f"row {row.name}: DATASET.GPU_DECODE did not apply (see the note above)")
    batches = _full_batches(train_loader, cfg.SOLVER.BATCH_SIZE)
    try:
        for _ in range(warmup):
            next(batches)
        synchronize(device)
        started = time.perf_counter()
        images = sum(len(next(batches)["target"]) for _ in range(steps))
        synchronize(device)
        seconds = time.perf_counter() - started
    finally:
        batches.close()
        shutdown_workers(train_loader)
    where = f"decode on {device}" if on_device else "PIL decode"
    what = row.what + (" [CPU: the same path with device cpu]" if on_device and device.type != "cuda" else "")
    return {"name": row.name, "what": what, "batch": cfg.SOLVER.BATCH_SIZE, "workers": cfg.DATASET.NUM_WORKERS,
            "batches_per_s": steps / seconds, "images_per_s": images / seconds, "steps": steps, "warmup": warmup,
            "seconds": seconds, "image_size": cfg.DATASET.IMAGE_SIZE, "loader_only": True,
            "data": f"{data.describe()}; {where}, {cfg.DATASET.NUM_WORKERS} workers"}


def format_loader_table(rows: list[dict]) -> str:
    """The loader rows' plain-text table, with each row's images/s over the first one's."""
    head = ["loader row", "batch", "workers", "batches/s", "images/s", f"vs {rows[0]['name']}"]
    return text_table(head, [[r["name"], str(r["batch"]), str(r["workers"]), f"{r['batches_per_s']:.2f}",
                              f"{r['images_per_s']:,.1f}", f"{r['images_per_s'] / rows[0]['images_per_s']:.2f}"]
                             for r in rows])


def text_table(head: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell: the first left-aligned, the others right-aligned."""
    lines = [head, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in lines)


# ---- timing ----
def build_random_distiller(cfg, num_classes: int, num_data: int | None = None) -> torch.nn.Module:
    """build_distiller without the teacher checkpoint: random teacher weights cost the same time."""
    distiller_class = get_distiller_class(cfg.DISTILLER.TYPE)
    size = cfg.DATASET.IMAGE_SIZE
    student = build_model(cfg.DISTILLER.STUDENT, num_classes, cfg.DATASET.TYPE, size)
    teacher = None
    if distiller_class.declares.requires_teacher:
        teacher = build_model(cfg.DISTILLER.TEACHER, num_classes, cfg.DATASET.TYPE, size).eval()
    return distiller_class(student, teacher, cfg, **build_kwargs(distiller_class, num_data))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, whose ops are synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warmup_steps(args: argparse.Namespace, cfg, device: torch.device) -> int:
    """Untimed steps: compilation, CUDA-graph capture, cudnn.benchmark's search and the allocator settle here."""
    cuda = device.type == "cuda"
    least = (50 if cuda else 5) if cfg.SOLVER.COMPILE else 1
    return max(args.warmup if args.warmup is not None else (30 if cuda else 3), least)


# Images whose 162 views a teacher_cache row builds for real, timed (the build's views/s); the rest of its full-size
# table is zeros: the step's speed depends on the values no more than on the random teacher's weights.
CACHE_BUILD_IMAGES = {"cuda": 2000, "cpu": 2}


def cache_table(cfg, distiller, device: torch.device, stack: contextlib.ExitStack) -> tuple[TeacherLogitTable, dict]:
    """A teacher_cache row's table: the real build (build_cache) over the first CACHE_BUILD_IMAGES images of the
    bench's training set, under the row's precision, then widened with zero rows to the whole set; the teacher is
    then released as in a run (kept for the views it still runs on: MLKD's strong view). Returns the table and the
    build's figures."""
    images, labels = read_train_arrays(cfg)
    count = min(CACHE_BUILD_IMAGES[device.type], len(images))
    folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_cache_"))
    built = build_cache(os.path.join(folder, "built"), distiller.teacher, images[:count],
                        run_identity(cfg, distiller.teacher, images[:count], labels[:count], device), device,
                        channels_last=bool(cfg.SOLVER.CHANNELS_LAST), verify_samples=64, progress=False)
    full = {**built, "num_images": len(images)}
    os.makedirs(os.path.join(folder, "full"))
    table_file = os.path.join(folder, "full", TABLE_FILE)
    os.replace(os.path.join(folder, "built", TABLE_FILE), table_file)
    rows, classes = table_shape(full)
    with open(table_file, "r+b") as f:
        f.truncate(rows * classes * STORAGE[full["dtype"]].itemsize)  # sparse zeros
    live_views = release_served_teacher(cfg, distiller)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    figures = {"cache_build_views_per_s": built["views_per_s"], "cache_build_views": count * VIEWS_PER_IMAGE,
               "cache_verify_max_abs_diff": built["verify"]["max_abs_diff"]}
    return TeacherLogitTable(os.path.join(folder, "full"), full, device, live_views), figures


class RowRun:
    """One row's fresh data, distiller and trainer; `step()` runs one real training step and returns its images."""

    def __init__(self, row: Row, cfg, data, device: torch.device, stack: contextlib.ExitStack):
        self.row, self.cfg, self.device = row, cfg, device
        set_seed(cfg.EXPERIMENT.SEED)
        self.batches, self.epoch_images, num_data, num_classes, self._close_data = data.open(cfg, device)
        run_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_run_"))
        distiller = build_random_distiller(cfg, num_classes, num_data)
        self.table, self.figures = None, {}
        if cfg.DISTILLER.TEACHER_CACHE:
            self.table, self.figures = cache_table(cfg, distiller, device, stack)
        self.trainer = Trainer(run_dir, distiller, None, None, cfg, device, teacher_cache=self.table)
        self.trainer.distiller.train()
        # the state training keeps for an epoch: same statistics, non-finite watch, per-step LR and host reads
        self.epoch = self.trainer.epoch_progress(1, max(self.epoch_images // cfg.SOLVER.BATCH_SIZE, 1))
        self.steps = 0

    def step(self) -> int:
        """Next batch, one Trainer.train_step (the very step train_epoch runs); the reference row also reads the loss on
        the host every step, as mdistiller's meters do."""
        batch = next(self.batches)
        self.steps += 1
        _, losses = self.trainer.train_step(batch, 1, self.steps, self.epoch)
        if self.row.sync_every_step:
            sum(term.mean() for term in losses.values()).item()
        return len(batch["target"])

    def close(self) -> None:
        """Free everything the row built (workers, compiled graphs, cached device memory)."""
        self._close_data()
        del self.trainer, self.batches
        gc.collect()
        if self.cfg.SOLVER.COMPILE:
            torch._dynamo.reset()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


@contextlib.contextmanager
def warmed_up(row: Row, cfg, data, device: torch.device, warmup: int) -> Iterator[RowRun]:
    """A row's run after `warmup` steps and a device synchronisation; closed (and freed) on exit."""
    with contextlib.ExitStack() as stack:
        run = RowRun(row, cfg, data, device, stack)
        try:
            for _ in range(warmup):
                run.step()
            synchronize(device)
            yield run
        finally:
            run.close()


def time_row(row: Row, cfg, data, device: torch.device, steps: int, warmup: int) -> dict:
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


# ---- profiling ----
def _self_device_us(event) -> float:
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def profile_row(row: Row, cfg, data, device: torch.device, warmup: int, folder: str) -> None:
    """~20 profiled steps of `row` after warm-up: a Chrome trace in `folder` and a printed summary of what limits
    speed (top kernels or ops, host time in data loading and in dispatch, device busy time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with warmed_up(row, cfg, data, device, warmup) as run:
        data_s = step_s = 0.0
        with profile(activities=activities) as prof:
            started = time.perf_counter()
            for _ in range(PROFILE_STEPS):
                t0 = time.perf_counter()
                batch = next(run.batches)
                t1 = time.perf_counter()
                run.steps += 1
                _, losses = run.trainer.train_step(batch, 1, run.steps, run.epoch)
                if row.sync_every_step:
                    sum(term.mean() for term in losses.values()).item()
                data_s += t1 - t0
                step_s += time.perf_counter() - t1
            synchronize(device)
            wall = time.perf_counter() - started
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


# ---- per-method mode ----
# Step time per batch of 64, resnet32x4 -> resnet8x4, relative to KD's (DKD paper, Zhao et al. 2022, Fig. 1 / Table:
# KD 11 ms, FitNet 14, OFD 19, RKD 25, ReviewKD 26, CRD 41): DISTILLER.TYPE -> ratio
PAPER_STEP_VS_KD = {"KD": 1.0, "FITNET": 14 / 11, "OFD": 19 / 11, "RKD": 25 / 11, "REVIEWKD": 26 / 11, "CRD": 41 / 11}
DOT_NAMES = ("kd+dot", "dot")
CIFAR_CLASSES = {"cifar100": 100, "cifar10": 10}


@dataclass(frozen=True)
class Method:
    """One method of the per-method table: its label (the name given) and its config file."""

    label: str
    path: str


def method_config(item: str, pair: str) -> Method:
    """A --methods item: a config file (a path or *.yaml), or a name -> configs/cifar100/<name>/<pair>.yaml."""
    if item.endswith((".yaml", ".yml")) or os.sep in item:
        if not os.path.isfile(resolve_project_path(item)):
            raise MdistillerError(f"--methods: config file not found: {item}")
        folder, stem = os.path.basename(os.path.dirname(item)), os.path.splitext(os.path.basename(item))[0]
        return Method(f"{folder}/{stem}" if folder else stem, item)
    name = item.lower()
    folder = "dot" if name in DOT_NAMES else name
    path = f"configs/cifar100/{folder}/{pair}.yaml"
    if not os.path.isfile(resolve_project_path(path)):
        raise MdistillerError(f"--methods: no config for method {item!r}: {path} does not exist (give a config file, "
                              f"or another --pair)")
    return Method(name, path)


def select_methods(text: str, pair: str) -> list[Method]:
    """KD first (the base of the ratios), then the listed methods in order, each once."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    methods = [method_config("kd", pair)]
    for item in items:
        method = method_config(item, pair)
        same = [m for m in methods if os.path.abspath(resolve_project_path(m.path)) ==
                os.path.abspath(resolve_project_path(method.path))]
        if same and same[0].label != "kd":
            raise MdistillerError(f"--methods names {method.path} twice ({same[0].label}, {method.label})")
        if not same:
            methods.append(method)
    return methods


def methods_row(args: argparse.Namespace, device: torch.device) -> Row:
    """The one row timed for every method: `ours` unless --rows names one other training row."""
    if args.cfg is not None or args.profile:
        raise MdistillerError("--methods picks each method's config and times one row: leave out --cfg and --profile")
    names = [n.strip() for n in args.rows.split(",") if n.strip()] or ["ours"]
    if len(names) != 1:
        raise MdistillerError(f"--methods times one row for every method; --rows names {len(names)}: {args.rows}")
    row = select_rows(names[0], "cifar", device)[0]
    if row.large_batch:
        raise MdistillerError("--methods times each method's own config; row large_batch is the KD large-batch config")
    return row


def bench_methods(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Per-method mode: one row for each method's config, KD first; prints the table, returns the rows' results."""
    row = methods_row(args, device)
    methods = select_methods(args.methods, args.pair)
    if args.json:
        check_writable(os.path.dirname(os.path.abspath(args.json)), "the --json folder")
    tiny = list(TINY_CIFAR_OPTS) if args.tiny else []
    loaded = [_load(resolve_project_path(m.path), [*tiny, *args.opts]) for m in methods]
    for method, cfg in zip(methods, loaded):
        if family_of(cfg) != "cifar" or cfg.DATASET.TYPE != loaded[0].DATASET.TYPE:
            raise MdistillerError(f"--methods times methods on KD's data ({loaded[0].DATASET.TYPE}); {method.path} "
                                  f"trains on {cfg.DATASET.TYPE}")
    for cfg in loaded:  # each built once before any data or timing: what only a built method finds fails now
        build_random_distiller(cfg, cfg.DATASET.NUM_CLASSES or CIFAR_CLASSES[cfg.DATASET.TYPE])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    steps = args.steps or (200 if device.type == "cuda" else 20)
    results = []
    with contextlib.ExitStack() as stack:
        data = CifarData(loaded[0], args.data, args.synthetic_size, stack)
        opts = [*tiny, *data.opts(), *args.opts, *row.opts]
        cfgs = [_load(resolve_project_path(m.path), opts) for m in methods]
        meta = {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
                "date": datetime.datetime.now().isoformat(timespec="seconds"), "mode": "methods", "row": row.name,
                "pair": f"{cfgs[0].DISTILLER.TEACHER} -> {cfgs[0].DISTILLER.STUDENT}", "data": data.describe(),
                "teacher_weights": "random"}
        print(f"device: {meta['device']}, torch {meta['torch']}, {meta['date']}\n"
              f"per-method: row {row.name} ({row.what}), {meta['pair']}; data: {meta['data']}\n"
              "teacher: random-initialised weights (speed does not depend on them)", flush=True)
        for method, cfg in zip(methods, cfgs):
            warmup = warmup_steps(args, cfg, device)
            print(f"  timing {method.label}: {warmup} warm-up + {steps} steps ...", file=sys.stderr, flush=True)
            result = time_row(row, cfg, data, device, steps, warmup)
            trainer = "+DOT" if cfg.SOLVER.TRAINER in DOT_TRAINERS else ""
            paper = PAPER_STEP_VS_KD.get(cfg.DISTILLER.TYPE) if not trainer else None
            result.update(method=method.label, config=method.path, distiller=cfg.DISTILLER.TYPE + trainer,
                          step_ms=1000.0 * result["seconds"] / result["steps"], paper_step_vs_kd=paper)
            results.append(result)
    for r in results:
        r["step_vs_kd"] = r["step_ms"] / results[0]["step_ms"]
        r["ratio"] = r["images_per_s"] / results[0]["images_per_s"]
    print(format_methods_table(results))
    print(f"s/epoch: {results[0]['epoch_images']:,} training images / images/s; step vs KD: the method's ms/step over "
          "KD's (1.30 = 30% slower); paper: the DKD paper's ratio (ms per batch of 64, resnet32x4 -> resnet8x4, GPU)")
    print("\n".join(f"  {r['method']}: {r['config']} ({r['distiller']})" for r in results))
    if args.markdown:
        print()
        print(format_methods_markdown(results))
    if args.json:
        _write_json(args.json, {**meta, "ratio_to": results[0]["method"], "rows": results})
    return results


def _method_cells(r: dict) -> list[str]:
    peak = "-" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib'] / 1024:.2f} GiB"
    rate = f"{r['images_per_s']:,.0f}" if r["images_per_s"] >= 100 else f"{r['images_per_s']:.1f}"
    paper = "-" if r["paper_step_vs_kd"] is None else f"{r['paper_step_vs_kd']:.2f}"
    return [r["method"], str(r["batch"]), rate, f"{r['step_ms']:.1f}", f"{r['step_vs_kd']:.2f}", paper,
            f"{r['seconds_per_epoch']:.1f}", peak]


METHOD_HEAD = ["method", "batch", "images/s", "ms/step", "step vs KD", "paper", "s/epoch", "peak GPU mem"]


def format_methods_table(rows: list[dict]) -> str:
    """The per-method plain-text table."""
    return text_table(METHOD_HEAD, [_method_cells(r) for r in rows])


def format_methods_markdown(rows: list[dict]) -> str:
    """The per-method table in Markdown."""
    lines = ["| " + " | ".join(METHOD_HEAD) + " |", "|" + "|".join(["---"] + ["---:"] * (len(METHOD_HEAD) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(_method_cells(r)) + " |" for r in rows])


# ---- output ----
def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def add_ratios(rows: list[dict]) -> str:
    """Each row's images/s over the reference row's (or the first row's when reference was not run)."""
    base = next((r for r in rows if r["name"] == "reference"), rows[0])
    for r in rows:
        r["ratio"] = r["images_per_s"] / base["images_per_s"]
    return base["name"]


def _cells(r: dict) -> list[str]:
    peak = "-" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib'] / 1024:.2f} GiB"
    rate = f"{r['images_per_s']:,.0f}" if r["images_per_s"] >= 100 else f"{r['images_per_s']:.1f}"
    return [r["name"], str(r["batch"]), rate, f"{r['seconds_per_epoch']:.1f}", peak, f"{r['ratio']:.2f}"]


def format_table(rows: list[dict], base: str) -> str:
    """The plain-text table."""
    return text_table(["row", "batch", "images/s", "s/epoch", "peak GPU mem", f"vs {base}"], [_cells(r) for r in rows])


def format_markdown(rows: list[dict], base: str) -> str:
    """The table and its legend in Markdown, for the README."""
    head = ["row", "batch", "images/s", "s/epoch", "peak GPU memory", f"vs {base}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    lines += [""] + [f"- `{r['name']}`: {r['what']}; data: {r['data']}" for r in rows]
    return "\n".join(lines)


def header(meta: dict) -> str:
    """The lines above the table."""
    lines = [f"device: {meta['device']}, torch {meta['torch']}, {meta['date']}",
             f"config: {meta['config']} ({meta['pair']}); data: {meta['data']}",
             "teacher: random-initialised weights (speed does not depend on them)"]
    if meta.get("loader_data"):
        lines.append(f"loader rows: {meta['loader_data']}")
    if meta["device_type"] == "cpu" and meta["family"] == "cifar":
        lines.append("on the CPU, 'ours' reads the same DataLoader as 'reference' (data live on the GPU only on "
                     "CUDA): it differs by the per-step host sync alone")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    """Time the selected rows and print the table (or profile one row); returns the rows' results."""
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise MdistillerError("--device cuda: no CUDA device is available (leave --device out to use the CPU)")
    device = torch.device(args.device) if args.device else default_device()
    for flag, value in (("--steps", args.steps), ("--warmup", args.warmup)):
        if value is not None and value < (1 if flag == "--steps" else 0):
            raise MdistillerError(f"{flag} must be {'positive' if flag == '--steps' else '>= 0'}, got {value}")
    if args.methods:
        return bench_methods(args, device)
    args.cfg = args.cfg or DEFAULT_CFG
    base = _load(args.cfg, list(args.opts))
    family = family_of(base)
    rows = select_rows(args.profile[0] if args.profile else args.rows, family, device)
    if args.json:  # fail now, not after minutes of timing
        check_writable(os.path.dirname(os.path.abspath(args.json)), "the --json folder")
    if args.profile:
        check_writable(args.profile[1], "the --profile folder")
        if rows[0].loader_only:
            raise MdistillerError(f"--profile traces training steps; row {rows[0].name} times the loader alone")
    tiny = list(TINY_IMAGENET_OPTS if family == "imagenet" else TINY_CIFAR_OPTS) if args.tiny else []
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # mdistiller's setting, and our runs' unless EXPERIMENT.DETERMINISTIC
    steps = args.steps or (200 if device.type == "cuda" else 20)
    with contextlib.ExitStack() as stack:
        data = ImageNetData() if family == "imagenet" else CifarData(base, args.data, args.synthetic_size, stack)
        base_opts = [*tiny, *data.opts(), *args.opts]
        # every config checked before any timing
        cfgs = {row.name: row_cfg(args, row, base_opts) for row in rows if not row.loader_only}
        loader_rows = [row for row in rows if row.loader_only]
        jpegs = None
        if loader_rows:
            jpegs = JpegFolderData(_load(args.cfg, [*tiny, *args.opts]), stack)
            cfgs.update({row.name: row_cfg(args, row, [*tiny, *args.opts, *jpegs.opts()]) for row in loader_rows})
        if args.profile:
            row = rows[0]
            profile_row(row, cfgs[row.name], data, device, warmup_steps(args, cfgs[row.name], device),
                        args.profile[1])
            return []
        first = cfgs[rows[0].name]
        meta = {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
                "date": datetime.datetime.now().isoformat(timespec="seconds"), "config": args.cfg, "family": family,
                "pair": f"{first.DISTILLER.TYPE} {first.DISTILLER.TEACHER} -> {first.DISTILLER.STUDENT}",
                "data": data.describe(), "teacher_weights": "random"}
        if jpegs is not None:
            meta["loader_data"] = jpegs.describe()
        print(header(meta), flush=True)
        results, loader_results = [], []
        for row in loader_rows:
            warmup = max(args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 2), 1)
            print(f"  timing {row.name}: {warmup} warm-up + {steps} batches ...", file=sys.stderr, flush=True)
            loader_results.append(time_loader_row(row, cfgs[row.name], jpegs, device, steps, warmup))
        for row in rows:
            if row.loader_only:
                continue
            warmup = warmup_steps(args, cfgs[row.name], device)
            print(f"  timing {row.name}: {warmup} warm-up + {steps} steps ...", file=sys.stderr, flush=True)
            results.append(time_row(row, cfgs[row.name], data, device, steps, warmup))
            if row.large_batch:
                results[-1]["what"] += f"; config {large_batch_source(args)}"
    base_name = add_ratios(results) if results else None
    if results:
        print(format_table(results, base_name))
        print(f"s/epoch: {results[0]['epoch_images']:,} training images / images/s (timed on full batches only)")
        print("\n".join(f"  {r['name']}: {r['what']}; data: {r['data']}" for r in results))
    if loader_results:
        print(format_loader_table(loader_results))
        print("\n".join(f"  {r['name']}: {r['what']}; data: {r['data']}" for r in loader_results))
    if args.markdown and results:
        print()
        print(format_markdown(results, base_name))
    if args.json:
        _write_json(args.json, {**meta, "ratio_to": base_name, "rows": results, "loader_rows": loader_results})
    return results + loader_results


def _write_json(path: str, payload: dict) -> None:
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
    except OSError as exc:
        raise MdistillerError(f"could not write {path}: {exc.strerror or exc}") from None


def entry_point() -> None:
    """The console script: main() with one-line errors."""
    run_cli(main)


if __name__ == "__main__":
    entry_point()
