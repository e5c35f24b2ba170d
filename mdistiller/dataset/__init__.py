"""Data sets and loaders. A distiller names the training views it needs; this module builds them.

`TRAIN_VIEWS` maps a view name to a function `(mean, std) -> transform` for the 32x32 CIFAR sets; `IMAGENET_VIEWS`
maps the same names to `(mean, std, image_size) -> transform` for ImageNet (registered by imagenet.py). A distiller
declares `train_views = {"image": "standard"}` (the default) or e.g. `{"image_weak": "standard", "image_strong":
"strong"}`, each data set builds its own version of the named views, and every training batch is a dict holding one
tensor per batch key plus "target" and "index".
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from ..engine.errors import MdistillerError
from .cifar import CIFAR_FORMATS, ensure_cifar, read_cifar_split

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
VIEW_REGISTRIES: dict[str, dict[str, Callable]] = {"cifar": TRAIN_VIEWS, "imagenet": IMAGENET_VIEWS}


def register_view(name: str, family: str = "cifar") -> Callable[[ViewBuilder], ViewBuilder]:
    """Decorator: make a training view available to distillers by name, for the CIFAR sets (builders `(mean, std)`)
    or, with family "imagenet", for ImageNet (builders `(mean, std, image_size)`)."""
    registry = VIEW_REGISTRIES[family]

    def wrap(builder: ViewBuilder) -> ViewBuilder:
        registry[name] = builder
        return builder

    return wrap


from . import augment  # noqa: E402, F401  (registers the "strong" view; needs register_view above)


class ImageArrayDataset(Dataset):
    """uint8 HWC images in memory; each item is a dict of transformed views plus target and index."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, views: Mapping[str, Callable]):
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.views = dict(views)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        image = Image.fromarray(self.images[index])
        item = {key: transform(image) for key, transform in self.views.items()}
        item["target"] = self.labels[index]
        item["index"] = index
        return item


def _build_views(view_names: Mapping[str, str], mean: tuple, std: tuple) -> dict[str, Callable]:
    views = {}
    for key, name in view_names.items():
        if name not in TRAIN_VIEWS:
            raise MdistillerError(f"unknown training view {name!r}; known: {', '.join(sorted(TRAIN_VIEWS))}")
        views[key] = TRAIN_VIEWS[name](mean, std)
    return views


def build_cifar_datasets(cfg, train_views: Mapping[str, str]) -> tuple[Dataset, Dataset, int]:
    """Train and test datasets of DATASET.TYPE (cifar100 / cifar10) and the class count."""
    fmt = CIFAR_FORMATS[cfg.DATASET.TYPE]
    folder = ensure_cifar(cfg.DATASET.TYPE, cfg.DATASET.ROOT, cfg.DATASET.DOWNLOAD)
    train_images, train_labels = read_cifar_split(cfg.DATASET.TYPE, folder, train=True)
    test_images, test_labels = read_cifar_split(cfg.DATASET.TYPE, folder, train=False)
    train_set = ImageArrayDataset(train_images, train_labels, _build_views(train_views, fmt.mean, fmt.std))
    test_set = ImageArrayDataset(test_images, test_labels, {"image": test_transform(fmt.mean, fmt.std)})
    return train_set, test_set, fmt.num_classes


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
    import random

    random.seed(seed)


def _device_resident_loaders(cfg, train_set: ImageArrayDataset, test_set: ImageArrayDataset, device, seed: int):
    from .device_cifar import DeviceCifarLoader

    fmt = CIFAR_FORMATS[cfg.DATASET.TYPE]
    train = DeviceCifarLoader(train_set.images, train_set.labels.numpy(), cfg.SOLVER.BATCH_SIZE, fmt.mean, fmt.std,
                              device, train=True, seed=seed)
    test = DeviceCifarLoader(test_set.images, test_set.labels.numpy(), cfg.DATASET.TEST.BATCH_SIZE, fmt.mean,
                             fmt.std, device, train=False, seed=seed)
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


def get_dataset(cfg, train_views: Mapping[str, str] | None = None, seed: int = 0, device=None):
    """(train_loader, val_loader, num_train, num_classes) for cfg.DATASET, mdistiller's signature.

    On CUDA with DATASET.DEVICE_RESIDENT, CIFAR lives on the GPU and is augmented there (see device_cifar.py).
    """
    if cfg.DATASET.TYPE not in DATASET_BUILDERS:
        known = ", ".join(sorted(DATASET_BUILDERS))
        raise MdistillerError(f"unknown DATASET.TYPE {cfg.DATASET.TYPE!r}; known: {known}")
    num_classes = num_classes_of(cfg)
    train_views = train_views or {"image": "standard"}
    train_set, test_set, _ = DATASET_BUILDERS[cfg.DATASET.TYPE](cfg, train_views)
    if uses_device_resident_data(cfg, train_views, device):
        train_loader, val_loader = _device_resident_loaders(cfg, train_set, test_set, device, seed)
        return train_loader, val_loader, len(train_set), num_classes
    workers = cfg.DATASET.NUM_WORKERS
    pin = torch.cuda.is_available()
    generator = torch.Generator()
    generator.manual_seed(seed)
    loader_class = getattr(train_set, "loader_class", DataLoader)  # a data set may bring its DataLoader subclass
    train_loader = loader_class(
        train_set,
        batch_size=cfg.SOLVER.BATCH_SIZE,
        shuffle=True,
        num_workers=workers,
        pin_memory=pin,
        worker_init_fn=_seed_worker,
        generator=generator,
        persistent_workers=workers > 0,
    )
    val_loader = eval_loader(test_set, cfg.DATASET.TEST.BATCH_SIZE, workers)
    return train_loader, val_loader, len(train_set), num_classes


def eval_loader(test_set: Dataset, batch_size: int, workers: int) -> DataLoader:
    """A sequential loader over the test set."""
    return getattr(test_set, "loader_class", DataLoader)(
        test_set, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=torch.cuda.is_available()
    )


def get_test_set(cfg) -> Dataset:
    """The test split of cfg.DATASET with the test transform (for tools/eval.py)."""
    num_classes_of(cfg)
    if cfg.DATASET.TYPE in TEST_SET_BUILDERS:
        return TEST_SET_BUILDERS[cfg.DATASET.TYPE](cfg)
    _, test_set, _ = DATASET_BUILDERS[cfg.DATASET.TYPE](cfg, {"image": "standard"})
    return test_set


from . import imagenet  # noqa: E402, F401  (registers DATASET.TYPE imagenet and its views; needs the tables above)
