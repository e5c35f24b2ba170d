"""The CIFAR-100 / CIFAR-10 data sets (DATASET.TYPE cifar100, cifar10): their 32x32 views, the in-memory training and
test sets, and the device-resident loaders of DATASET.DEVICE_RESIDENT (device_cifar.py).

Views, by the names a distiller's `train_views` uses: "standard" (RandomCrop(32, padding 4) + horizontal flip +
normalise: the CIFAR recipe of every table), "test" (normalise only: the training images unaugmented, e.g. for
tools/wkd_cost_matrix.py), and "strong" (augment.py).
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from .cifar import CIFAR_FORMATS, check_cifar_present, ensure_cifar, read_cifar_split
from .contrastive import ContrastiveSampler, contrastive_sampler
from .device_cifar import DeviceCifarLoader
from .registry import TRAIN_VIEWS, DataRequest, register_dataset
from .teacher_views import recorded_standard_transform


@TRAIN_VIEWS.register("standard")
def standard_train_transform(mean: tuple, std: tuple) -> Callable:
    """RandomCrop(32, padding 4) + horizontal flip + normalise: the CIFAR recipe of every table."""
    return transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


@TRAIN_VIEWS.register("test")
def test_transform(mean: tuple, std: tuple) -> Callable:
    """Normalise only."""
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])


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


def build_cifar_views(view_names: Mapping[str, str], mean: tuple, std: tuple,
                      record_key: str | None = None) -> dict[str, Callable]:
    """Batch key -> CIFAR transform for the view names a distiller declares (the `record_key` view with its ids)."""
    views = {}
    for key, name in view_names.items():
        builder = TRAIN_VIEWS.get(name)
        views[key] = recorded_standard_transform(mean, std) if key == record_key else builder(mean, std)
    return views


def cifar_num_classes(cfg) -> int:
    """The class count of the CIFAR variant (fixed: nothing is read)."""
    return CIFAR_FORMATS[cfg.DATASET.TYPE].num_classes


def check_cifar_data(cfg) -> None:
    """The CIFAR folder is there, or DATASET.DOWNLOAD will fetch it."""
    check_cifar_present(cfg.DATASET.TYPE, cfg.DATASET.ROOT, cfg.DATASET.DOWNLOAD)


def build_cifar_test_set(cfg) -> ImageArrayDataset:
    """The test split with the test transform."""
    fmt = CIFAR_FORMATS[cfg.DATASET.TYPE]
    folder = ensure_cifar(cfg.DATASET.TYPE, cfg.DATASET.ROOT, cfg.DATASET.DOWNLOAD)
    images, labels = read_cifar_split(cfg.DATASET.TYPE, folder, train=False)
    return ImageArrayDataset(images, labels, {"image": test_transform(fmt.mean, fmt.std)})


def cifar_device_loaders(cfg, train_set: ImageArrayDataset, test_set: ImageArrayDataset, request: DataRequest,
                         needs: Mapping[str, object], seed: int, rank: int,
                         world_size: int) -> tuple[DeviceCifarLoader, DeviceCifarLoader]:
    """Training and test loaders holding the sets on request.device, augmented there (device_cifar.py)."""
    fmt = CIFAR_FORMATS[cfg.DATASET.TYPE]
    device = request.device
    train = DeviceCifarLoader(train_set.images, train_set.labels.numpy(), cfg.SOLVER.BATCH_SIZE, fmt.mean, fmt.std,
                              device, train=True, seed=seed, rank=rank, world_size=world_size,
                              contrastive=contrastive_sampler(train_set, needs, device),
                              record_views=request.record_views is not None)
    test = DeviceCifarLoader(test_set.images, test_set.labels.numpy(), cfg.DATASET.TEST.BATCH_SIZE, fmt.mean,
                             fmt.std, device, train=False, seed=seed, rank=rank, world_size=world_size)
    return train, test


@register_dataset("cifar100", "cifar10", num_classes=cifar_num_classes, test_set=build_cifar_test_set,
                  check=check_cifar_data, device_loaders=cifar_device_loaders)
def build_cifar_datasets(cfg, request: DataRequest) -> tuple[ImageArrayDataset, ImageArrayDataset, int]:
    """Train set (the requested views; the `request.record_views` batch key's items also carry "view_id"), test set
    (test transform) and the class count."""
    fmt = CIFAR_FORMATS[cfg.DATASET.TYPE]
    folder = ensure_cifar(cfg.DATASET.TYPE, cfg.DATASET.ROOT, cfg.DATASET.DOWNLOAD)
    train_images, train_labels = read_cifar_split(cfg.DATASET.TYPE, folder, train=True)
    test_set = build_cifar_test_set(cfg)
    views = build_cifar_views(request.train_views, fmt.mean, fmt.std, request.record_views)
    return ImageArrayDataset(train_images, train_labels, views), test_set, fmt.num_classes
