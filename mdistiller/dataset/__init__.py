"""Data sets and loaders. A distiller names the training views it needs; this module builds them.

`TRAIN_VIEWS` maps a view name to a function `(mean, std) -> transform` for the 32x32 CIFAR sets; `IMAGENET_VIEWS`
maps the same names to `(mean, std, image_size) -> transform` for ImageNet (registered by imagenet.py) and
`TINY_IMAGENET_VIEWS` to `(mean, std) -> transform` for Tiny-ImageNet's 64x64 images (tiny_imagenet.py). A distiller
declares `train_views = {"image": "standard"}` (the default) or e.g. `{"image_weak": "standard", "image_strong":
"strong"}`, each data set builds its own version of the named views, and every training batch is a dict holding one
tensor per batch key plus "target" and "index".

A distiller may also need more in each training batch (its `batch_needs(cfg)`, names listed in BATCH_NEEDS): CRD's
"contrastive_index" (contrastive.py) is served by ImageArrayDataset and the ImageNet / Tiny-ImageNet folders per item,
and by the device-resident CIFAR loader per global batch.
"""

from __future__ import annotations

import functools
import random
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, Subset
from torchvision import transforms

from .. import distributed
from ..errors import MdistillerError
from .cifar import CIFAR_FORMATS, check_cifar_present, ensure_cifar, read_cifar_split
from .contrastive import ContrastiveSampler
from .device_cifar import DeviceCifarLoader

ViewBuilder = Callable[[tuple, tuple], Callable]


def standard_train_transform(mean: tuple, std: tuple) -> Callable:
    """RandomCrop(32, padding 4) + horizontal flip + normalise: the CIFAR recipe of every table."""
    return transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def test_transform(mean: tuple, std: tuple) -> Callable:
    """Normalise only."""
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])


TRAIN_VIEWS: dict[str, ViewBuilder] = {"standard": standard_train_transform}
# ImageNet-sized views by the same names: `(mean, std, image_size) -> transform` (filled by imagenet.py).
IMAGENET_VIEWS: dict[str, Callable[[tuple, tuple, int], Callable]] = {}
# Tiny-ImageNet views by the same names: `(mean, std) -> transform` (filled by tiny_imagenet.py).
TINY_IMAGENET_VIEWS: dict[str, ViewBuilder] = {}
VIEW_REGISTRIES: dict[str, dict[str, Callable]] = {
    "cifar": TRAIN_VIEWS, "imagenet": IMAGENET_VIEWS, "tiny_imagenet": TINY_IMAGENET_VIEWS,
}


def register_view(name: str, family: str = "cifar") -> Callable[[ViewBuilder], ViewBuilder]:
    """Decorator: make a training view available to distillers by name, for the CIFAR sets (builders `(mean, std)`),
    with family "imagenet" for ImageNet (builders `(mean, std, image_size)`), with family "tiny_imagenet" for
    Tiny-ImageNet (builders `(mean, std)`)."""
    registry = VIEW_REGISTRIES[family]

    def wrap(builder: ViewBuilder) -> ViewBuilder:
        registry[name] = builder
        return builder

    return wrap


from . import augment  # noqa: E402, F401  (registers the "strong" view; needs register_view above)
from .teacher_views import recorded_standard_transform, view_refusal  # noqa: E402


class ImageArrayDataset(Dataset):
    """uint8 HWC images in memory; each item is a dict of transformed views plus target and index (and
    "contrastive_index" once `contrastive` is set, see serve_batch_needs)."""

    contrastive: ContrastiveSampler | None = None

    def __init__(self, images: np.ndarray, labels: np.ndarray, views: Mapping[str, Callable]):
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.views = dict(views)

    def __len__(self) -> int:
        return len(self.labels)

    def class_labels(self) -> torch.Tensor:
        """The class of every sample, in index order."""
        return self.labels

    def __getitem__(self, index: int) -> dict:
        item = {}
        if self.contrastive is not None:  # drawn before the views: from the RNG state at the item's start
            item["contrastive_index"] = self.contrastive.draw_one(index, self.labels[index])
        image = Image.fromarray(self.images[index])
        for key, transform in self.views.items():
            view = transform(image)
            if isinstance(view, tuple):  # a view that also says how it was drawn: (tensor, {"view_id": ...})
                view, drawn = view
                item.update(drawn)
            item[key] = view
        item["target"] = self.labels[index]
        item["index"] = index
        return item


def _build_views(view_names: Mapping[str, str], mean: tuple, std: tuple,
                 record_key: str | None = None) -> dict[str, Callable]:
    views = {}
    for key, name in view_names.items():
        if name not in TRAIN_VIEWS:
            raise MdistillerError(f"unknown training view {name!r}; known: {', '.join(sorted(TRAIN_VIEWS))}")
        views[key] = recorded_standard_transform(mean, std) if key == record_key else TRAIN_VIEWS[name](mean, std)
    return views


def build_cifar_datasets(cfg, train_views: Mapping[str, str], device=None,
                         record_views: str | None = None) -> tuple[Dataset, Dataset, int]:
    """Train and test datasets of DATASET.TYPE (cifar100 / cifar10) and the class count (`device`: unused, the
    builders' common signature). `record_views`: the batch key whose view ids the items also carry ("view_id")."""
    fmt = CIFAR_FORMATS[cfg.DATASET.TYPE]
    folder = ensure_cifar(cfg.DATASET.TYPE, cfg.DATASET.ROOT, cfg.DATASET.DOWNLOAD)
    train_images, train_labels = read_cifar_split(cfg.DATASET.TYPE, folder, train=True)
    test_images, test_labels = read_cifar_split(cfg.DATASET.TYPE, folder, train=False)
    train_set = ImageArrayDataset(train_images, train_labels,
                                  _build_views(train_views, fmt.mean, fmt.std, record_views))
    test_set = ImageArrayDataset(test_images, test_labels, {"image": test_transform(fmt.mean, fmt.std)})
    return train_set, test_set, fmt.num_classes


# DATASET.TYPE -> (cfg, train_views, device=None) -> (train set, test set, class count)
DATASET_BUILDERS: dict[str, Callable] = {"cifar100": build_cifar_datasets, "cifar10": build_cifar_datasets}
# Data sets whose class count is read from the files (ImageNet: its class folders): DATASET.TYPE -> cfg -> count.
CLASS_COUNTERS: dict[str, Callable] = {}
# Data sets that can build their test split alone (without scanning the training set): DATASET.TYPE -> cfg -> set.
TEST_SET_BUILDERS: dict[str, Callable] = {}


def num_classes_of(cfg) -> int:
    """The class count of DATASET.TYPE, checked against DATASET.NUM_CLASSES when that is set."""
    known = {name: fmt.num_classes for name, fmt in CIFAR_FORMATS.items()}
    if cfg.DATASET.TYPE in CLASS_COUNTERS:
        count = CLASS_COUNTERS[cfg.DATASET.TYPE](cfg)
    elif cfg.DATASET.TYPE not in known:
        names = ", ".join(sorted([*known, *CLASS_COUNTERS]))
        raise MdistillerError(f"unknown DATASET.TYPE {cfg.DATASET.TYPE!r}; known: {names}")
    else:
        count = known[cfg.DATASET.TYPE]
    if cfg.DATASET.NUM_CLASSES not in (0, count):
        raise MdistillerError(
            f"DATASET.NUM_CLASSES is {cfg.DATASET.NUM_CLASSES} but {cfg.DATASET.TYPE} has {count} classes"
        )
    return count


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _seed_rank_worker(rank: int, worker_id: int) -> None:
    """Under torchrun every rank's workers get the same seeds from the shared generator: mix the rank in."""
    seed = distributed.rank_seed(torch.initial_seed(), rank)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class ShardedBatchSampler(Sampler[list[int]]):
    """Rank's share of the global batches a one-process shuffled DataLoader draws from the same generator.

    The permutation comes from a RandomSampler on `generator` (the loader's seeded generator, identical on every rank
    and saved by the trainer for resume), cut into global batches of `batch_size` (the last one partial) exactly as a
    BatchSampler does: the N-process run trains on the 1-process run's global batches. Rank r takes the r-th of
    `world_size` contiguous, near-equal slices of each; a last batch smaller than world_size is dropped (it cannot
    give every rank a sample). No set_epoch: each pass draws the next permutation from the generator, as a
    one-process loader does, so restoring the generator's state replays an epoch.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, generator: torch.Generator):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size = rank, world_size
        self.generator = generator

    def global_batches(self) -> Iterator[list[int]]:
        """The global batches of one pass (advances the generator like a one-process loader)."""
        batch: list[int] = []
        for index in RandomSampler(range(self.num_samples), generator=self.generator):
            batch.append(index)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            if len(batch) >= self.world_size:
                start, end = distributed.shard_bounds(len(batch), self.rank, self.world_size)
                yield batch[start:end]

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + (1 if rest >= self.world_size else 0)


def _device_resident_loaders(cfg, train_set: ImageArrayDataset, test_set: ImageArrayDataset, device, seed: int,
                             rank: int, world_size: int, needs: Mapping[str, object], record_views: bool = False):
    fmt = CIFAR_FORMATS[cfg.DATASET.TYPE]
    train = DeviceCifarLoader(train_set.images, train_set.labels.numpy(), cfg.SOLVER.BATCH_SIZE, fmt.mean, fmt.std,
                              device, train=True, seed=seed, rank=rank, world_size=world_size,
                              contrastive=contrastive_sampler(train_set, needs, device), record_views=record_views)
    test = DeviceCifarLoader(test_set.images, test_set.labels.numpy(), cfg.DATASET.TEST.BATCH_SIZE, fmt.mean,
                             fmt.std, device, train=False, seed=seed, rank=rank, world_size=world_size)
    return train, test


def uses_device_resident_data(cfg, train_views: Mapping[str, str], device) -> bool:
    """DATASET.DEVICE_RESIDENT applies to CIFAR on CUDA when the distiller needs only the standard view."""
    return (
        bool(cfg.DATASET.DEVICE_RESIDENT)
        and device is not None
        and torch.device(device).type == "cuda"
        and cfg.DATASET.TYPE in CIFAR_FORMATS
        and dict(train_views) == {"image": "standard"}
    )


def with_augment(train_views: Mapping[str, str], cfg) -> dict[str, str]:
    """The views to build: DATASET.AUGMENT (a view name, e.g. "deit") replaces the "standard" view when set."""
    chosen = cfg.DATASET.AUGMENT
    return {key: chosen if chosen and name == "standard" else name for key, name in train_views.items()}


# What a distiller may ask the training batches to carry besides its views, "target" and "index" (its
# `batch_needs(cfg)`, a dict need -> parameters); every data path serves each need or refuses it in one line.
BATCH_NEEDS: tuple[str, ...] = (
    "contrastive_index",  # CRD: {"k": negatives per sample, "mode": "exact" | "relax"}; see contrastive.py
    # the teacher-output cache: which of CIFAR's 162 enumerable views each image is (teacher_views.py); parameter:
    # the batch key of the standard view. CIFAR serves it on both paths; the other data sets refuse it.
    "view_id",
)


def _view_id_key(cfg, needs: Mapping[str, object], train_views: Mapping[str, str]) -> str | None:
    """The batch key whose view ids the batches carry (need "view_id"), None without the need; a view or data set
    whose views cannot be enumerated is refused in one line."""
    if "view_id" not in needs:
        return None
    key = needs["view_id"]
    if key not in train_views:
        raise MdistillerError(f"view ids asked for batch key {key!r}, which is not a training view of this run "
                              f"({', '.join(train_views)})")
    reason = view_refusal(cfg.DATASET.TYPE, train_views[key])
    if reason:
        raise MdistillerError(f"the data path cannot give view ids for {key}: {reason}")
    return key


def check_batch_needs(needs: Mapping[str, object]) -> None:
    """A need no data path knows is a one-line error (a distiller asking for something the data cannot give)."""
    unknown = sorted(set(needs) - set(BATCH_NEEDS))
    if unknown:
        raise MdistillerError(f"the data path cannot serve {', '.join(unknown)} (known batch needs: "
                              f"{', '.join(BATCH_NEEDS) or 'none'})")


def contrastive_sampler(train_set: Dataset, needs: Mapping[str, object], device=None) -> ContrastiveSampler | None:
    """The sampler of the "contrastive_index" need over `train_set`'s labels (on `device`), or None without the need.
    The data set's `contrastive_replacement` ("always" for the ImageNet folders, as upstream) sets the rule."""
    spec = needs.get("contrastive_index")
    if spec is None:
        return None
    if not hasattr(train_set, "class_labels"):
        raise MdistillerError(f"the training set ({type(train_set).__name__}) cannot serve contrastive_index")
    labels = train_set.class_labels().to(device or "cpu")
    return ContrastiveSampler(labels, spec["k"], spec.get("mode", "exact"),
                              getattr(train_set, "contrastive_replacement", "when_needed"))


def serve_batch_needs(train_set: Dataset, needs: Mapping[str, object]) -> None:
    """Make the items of a DataLoader's training set carry what `needs` asks for (drawn per item, in the workers)."""
    sampler = contrastive_sampler(train_set, needs)
    if sampler is not None:
        train_set.contrastive = sampler


def get_dataset(cfg, train_views: Mapping[str, str] | None = None, seed: int = 0, device=None,
                rank: int | None = None, world_size: int | None = None, needs: Mapping[str, object] | None = None):
    """(train_loader, val_loader, num_train, num_classes) for cfg.DATASET, mdistiller's signature.

    `needs` (a distiller's `batch_needs(cfg)`): what the training batches must carry besides the views, "target" and
    "index" (see BATCH_NEEDS).

    On CUDA with DATASET.DEVICE_RESIDENT, CIFAR lives on the GPU and is augmented there (see device_cifar.py).
    Under torchrun (rank and world_size default to the process group's) SOLVER.BATCH_SIZE is the global batch: the
    training loader yields this rank's share of each global batch (ShardedBatchSampler), the test loader this rank's
    contiguous share of the test set.
    """
    rank = distributed.rank() if rank is None else rank
    world_size = distributed.world_size() if world_size is None else world_size
    needs = dict(needs or {})
    check_batch_needs(needs)
    if cfg.DATASET.TYPE not in DATASET_BUILDERS:
        known = ", ".join(sorted(DATASET_BUILDERS))
        raise MdistillerError(f"unknown DATASET.TYPE {cfg.DATASET.TYPE!r}; known: {known}")
    train_views = with_augment(train_views or {"image": "standard"}, cfg)
    record_key = _view_id_key(cfg, needs, train_views)
    num_classes = num_classes_of(cfg)
    recording = {"record_views": record_key} if record_key else {}  # only the CIFAR builder takes it
    train_set, test_set, _ = DATASET_BUILDERS[cfg.DATASET.TYPE](cfg, train_views, device=device, **recording)
    if uses_device_resident_data(cfg, train_views, device):
        train_loader, val_loader = _device_resident_loaders(cfg, train_set, test_set, device, seed, rank, world_size,
                                                            needs, record_views=record_key is not None)
        return train_loader, val_loader, len(train_set), num_classes
    serve_batch_needs(train_set, needs)
    workers = cfg.DATASET.NUM_WORKERS
    pin = torch.cuda.is_available()
    generator = torch.Generator()
    generator.manual_seed(seed)
    loader_class = getattr(train_set, "loader_class", DataLoader)  # a data set may bring its DataLoader subclass
    if world_size == 1:
        batching = {"batch_size": cfg.SOLVER.BATCH_SIZE, "shuffle": True, "worker_init_fn": _seed_worker}
    else:
        sampler = ShardedBatchSampler(len(train_set), cfg.SOLVER.BATCH_SIZE, rank, world_size, generator)
        batching = {"batch_sampler": sampler, "worker_init_fn": functools.partial(_seed_rank_worker, rank)}
    train_loader = loader_class(
        train_set,
        num_workers=workers,
        pin_memory=pin,
        generator=generator,
        persistent_workers=workers > 0,
        **batching,
    )
    val_loader = eval_loader(test_set, cfg.DATASET.TEST.BATCH_SIZE, workers, rank, world_size)
    return train_loader, val_loader, len(train_set), num_classes


def shutdown_workers(loader) -> None:
    """Stop the worker processes of a DataLoader's current iterator (persistent workers outlive an epoch's iterator;
    a new iterator then starts fresh ones)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None


def eval_loader(test_set: Dataset, batch_size: int, workers: int, rank: int = 0, world_size: int = 1) -> DataLoader:
    """A sequential loader over the test set, or over rank's contiguous share of it when world_size > 1."""
    loader_class = getattr(test_set, "loader_class", DataLoader)
    if world_size > 1:
        start, end = distributed.shard_bounds(len(test_set), rank, world_size)
        test_set = Subset(test_set, range(start, end))
    return loader_class(
        test_set, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=torch.cuda.is_available()
    )


def check_data(cfg) -> None:
    """That the data of DATASET.TYPE is there (or will be downloaded), without reading it: a missing folder, an
    unknown type or a class count that contradicts DATASET.NUM_CLASSES is a one-line error before any side effect."""
    num_classes_of(cfg)
    if cfg.DATASET.TYPE in CIFAR_FORMATS:
        check_cifar_present(cfg.DATASET.TYPE, cfg.DATASET.ROOT, cfg.DATASET.DOWNLOAD)


def get_test_set(cfg) -> Dataset:
    """The test split of cfg.DATASET with the test transform (for tools/eval.py)."""
    num_classes_of(cfg)
    if cfg.DATASET.TYPE in TEST_SET_BUILDERS:
        return TEST_SET_BUILDERS[cfg.DATASET.TYPE](cfg)
    _, test_set, _ = DATASET_BUILDERS[cfg.DATASET.TYPE](cfg, {"image": "standard"})
    return test_set


from . import imagenet  # noqa: E402, F401, I001  (registers DATASET.TYPE imagenet and its views; needs the tables)
from . import deit_views  # noqa: E402, F401  (registers the ImageNet "deit" view; needs register_view)
from . import tiny_imagenet  # noqa: E402, F401  (registers DATASET.TYPE tiny_imagenet; needs imagenet's folder)
