"""Where a row's batches come from, behind one small protocol (`DataSource`): the CIFAR files (real or random ones
written to a temp folder), synthetic ImageNet-shaped device tensors, and an ImageNet JPEG folder for the loader rows.
`open` gives a row its endless stream of full batches."""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
from PIL import Image

from ...dataset import check_batch_needs, get_dataset, shutdown_workers
from ...dataset.cifar import CIFAR_FORMATS
from ...dataset.cifar_files import write_cifar
from ...dataset.contrastive import ContrastiveSampler
from ...dataset.imagenet import DECODE_ON_CPU_ENV, ImageNetJpegFolder
from ...distillers import get_distiller_class
from ...engine.run import check_fits_data
from ...engine.teacher_cache import cache_batch_needs
from ...errors import MdistillerError

FULL_TRAIN_SIZE = {"cifar100": 50_000, "cifar10": 50_000, "imagenet": 1_281_167}


@dataclass
class Batches:
    """A data source opened for one row."""

    stream: Iterator[dict]  # endless full training batches, carrying what the distiller's batch_needs ask for
    epoch_images: int  # the training-set size an epoch is counted over (the full one for synthetic data)
    num_data: int  # the training-set size the row's loader holds
    num_classes: int
    close: Callable[[], None]
    note: str = ""  # how the batches are made, where the source says more than the row's config


class DataSource(Protocol):
    """What every row's data offers: overrides that point a config at it, a description, and its batches."""

    def describe(self) -> str:
        """Where the images come from, for the header."""

    def opts(self) -> list[str]:
        """The overrides that point a row's config at these images."""

    def open(self, cfg, device: torch.device) -> Batches:
        """The row's batches."""


def full_batches(loader, batch_size: int) -> Iterator[dict]:
    """Endless full batches of a loader, epoch after epoch."""
    # The partial last batch of an epoch is loaded but not trained on: under torch.compile its new shape means a
    # recompilation (once per run in training), which a steady-state figure must not include.
    while True:
        for batch in loader:
            if len(batch["target"]) == batch_size:
                yield batch


def _loader_batches(train_loader, cfg, num_train: int, num_classes: int, epoch_images: int, note: str = "") -> Batches:
    stream = full_batches(train_loader, cfg.SOLVER.BATCH_SIZE)

    def close() -> None:
        stream.close()
        shutdown_workers(train_loader)

    return Batches(stream, epoch_images, num_train, num_classes, close, note)


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

    def open(self, cfg, device: torch.device) -> Batches:
        """The row's training loader, built by get_dataset with the distiller's (and the cache's) batch needs."""
        distiller_class = get_distiller_class(cfg.DISTILLER.TYPE)
        train_loader, _, num_train, num_classes = get_dataset(cfg, distiller_class.declares.train_views,
                                                              seed=cfg.EXPERIMENT.SEED, device=device,
                                                              needs={**distiller_class.batch_needs_of(cfg),
                                                                     **cache_batch_needs(cfg, distiller_class)})
        check_fits_data(cfg, num_train)
        return _loader_batches(train_loader, cfg, num_train, num_classes, self.epoch_images or num_train)


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

    def open(self, cfg, device: torch.device) -> Batches:
        """Two device batches in turn; a "contrastive_index" need is drawn as the ImageNet folder draws it (over the
        full training-set size)."""
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
        return Batches(itertools.cycle(pool), self.epoch_images, self.epoch_images, num_classes, lambda: None)


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

    def open(self, cfg, device: torch.device) -> Batches:
        """The row's training loader alone (PIL decode in the workers, or DATASET.GPU_DECODE on the device); its note
        says which decode ran."""
        views = get_distiller_class(cfg.DISTILLER.TYPE).declares.train_views
        with _decode_on(device, cfg), contextlib.redirect_stdout(sys.stderr):  # the loader's one-line notes
            train_loader, _, num_train, num_classes = get_dataset(cfg, views, seed=cfg.EXPERIMENT.SEED, device=device)
        on_device = isinstance(train_loader.dataset, ImageNetJpegFolder)
        if bool(cfg.DATASET.GPU_DECODE) != on_device:
            shutdown_workers(train_loader)
            raise MdistillerError("DATASET.GPU_DECODE did not apply (see the note above)")
        note = f"decode on {device}" if on_device else "PIL decode"
        return _loader_batches(train_loader, cfg, num_train, num_classes, num_train, note)


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
