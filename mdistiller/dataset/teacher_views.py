"""The data side of the teacher-output cache: CIFAR's 162 enumerable training views, their ids on both data paths, and
the training set's fingerprint.

The standard CIFAR view is RandomCrop(32, padding 4) of the zero-padded uint8 image followed by a horizontal flip: 9 x
9 offsets x 2 flips = 162 views per image, numbered as device_cifar.VIEW_ORDER says. The GPU-resident loader draws
offsets and flips itself (`record_views`); on the DataLoader path `RecordedCropFlip` replaces the standard transform
when a batch needs "view_id": it draws its random numbers exactly as torchvision's RandomCrop + RandomHorizontalFlip do
(same calls, same order), so a run's images are the same whether or not it records them.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms

from .cifar import CIFAR_FORMATS, ensure_cifar, read_cifar_split
from .device_cifar import PAD, SIZE, VIEWS_PER_IMAGE, DeviceCifarLoader, crop_flip, decode_views, normalize_uint8
from .registry import BATCH_NEEDS

PAD_FILL = 0  # RandomCrop's fill: black uint8 pixels, i.e. -mean/std after normalisation
ENUMERABLE_VIEWS = ("standard",)  # the CIFAR views made of a crop offset and a flip only

BATCH_NEEDS.register("view_id", "which of CIFAR's 162 enumerable views each image is, for the teacher-output cache; "
                                "parameter: the batch key of the standard view (the other data sets refuse it)")

# Why a data set's training views cannot be enumerated (DATASET.TYPE -> reason), for the cache's refusals.
NOT_ENUMERABLE = {
    "imagenet": "ImageNet's RandomResizedCrop draws continuous scales, aspect ratios and positions",
    "tiny_imagenet": "Tiny-ImageNet's RandomRotation(20) draws a continuous angle",
}


def view_refusal(dataset_type: str, view_name: str) -> str | None:
    """Why the training view `view_name` of `dataset_type` cannot be enumerated (None for CIFAR's crop + flip)."""
    if dataset_type not in CIFAR_FORMATS:
        return NOT_ENUMERABLE.get(dataset_type, f"DATASET.TYPE {dataset_type}'s training views are not enumerable")
    if view_name not in ENUMERABLE_VIEWS:
        return f"the '{view_name}' view draws random augmentation operations, not a crop offset and a flip alone"
    return None


class RecordedCropFlip:
    """The standard CIFAR training view that also says which view it drew: `image -> (tensor, {"view_id": int})`.

    Same random calls in the same order as `RandomCrop(32, padding=4)` + `RandomHorizontalFlip()`, the same PIL ops
    and the same ToTensor + Normalize: the tensors equal the standard transform's under the same seed.
    """

    def __init__(self, mean: tuple, std: tuple):
        self.mean, self.std = mean, std

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, dict]:
        padded = TF.pad(image, PAD, fill=PAD_FILL)
        dy, dx, _, _ = transforms.RandomCrop.get_params(padded, (SIZE, SIZE))
        crop = TF.crop(padded, dy, dx, SIZE, SIZE)
        flip = bool(torch.rand(1) < 0.5)
        if flip:
            crop = TF.hflip(crop)
        tensor = TF.normalize(TF.to_tensor(crop), self.mean, self.std)
        return tensor, {"view_id": ((2 * PAD + 1) * dy + dx) * 2 + int(flip)}


def recorded_standard_transform(mean: tuple, std: tuple) -> Callable:
    """The standard view with its view id (see RecordedCropFlip)."""
    return RecordedCropFlip(mean, std)


def pil_view(image: np.ndarray, view_id: int, mean: tuple, std: tuple) -> torch.Tensor:
    """View `view_id` of one uint8 HWC image, made with torchvision's PIL ops (pad, crop, flip, normalise): the
    independent reference the cache's verification compares against."""
    offsets, flips = decode_views(torch.tensor([view_id]))
    crop = TF.crop(TF.pad(Image.fromarray(image), PAD, fill=PAD_FILL), int(offsets[0, 0]), int(offsets[0, 1]), SIZE,
                   SIZE)
    if bool(flips[0]):
        crop = TF.hflip(crop)
    return TF.normalize(TF.to_tensor(crop), mean, std)


def views_of(images: torch.Tensor, rows: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The normalised views of table `rows` (image index * 162 + view id) from uint8 NCHW `images` (on their device)."""
    index, view_ids = rows // VIEWS_PER_IMAGE, rows % VIEWS_PER_IMAGE
    offsets, flips = decode_views(view_ids)
    return normalize_uint8(crop_flip(images[index], offsets, flips), mean, std)


def data_fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of the training set: shape, uint8 HWC images and int64 labels, in index order."""
    digest = hashlib.sha256()
    images = np.ascontiguousarray(images, dtype=np.uint8)
    digest.update(repr(tuple(images.shape)).encode())
    digest.update(memoryview(images).cast("B"))
    digest.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return digest.hexdigest()


def loader_arrays(loader) -> tuple[np.ndarray, np.ndarray]:
    """The training set behind a training loader, as uint8 (N, 32, 32, 3) HWC images and int64 labels."""
    if isinstance(loader, DeviceCifarLoader):
        return loader.images.permute(0, 2, 3, 1).cpu().numpy(), loader.labels.cpu().numpy()
    dataset = loader.dataset
    return np.asarray(dataset.images), dataset.labels.numpy()


def read_train_arrays(cfg) -> tuple[np.ndarray, np.ndarray]:
    """The CIFAR training split of cfg.DATASET (downloaded when missing and allowed), uint8 HWC images and labels."""
    folder = ensure_cifar(cfg.DATASET.TYPE, cfg.DATASET.ROOT, cfg.DATASET.DOWNLOAD)
    return read_cifar_split(cfg.DATASET.TYPE, folder, train=True)
