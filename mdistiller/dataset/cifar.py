"""CIFAR-10/100 from torchvision's on-disk pickle formats, validated by structure rather than checksums.

torchvision's own CIFAR classes verify the MD5 sums of the official archives and so reject any re-packed copy
(including the small files the tests write); this reader parses the same format and checks shapes, label range and
counts instead, with errors that say what is wrong and where.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np

from ..errors import MdistillerError


@dataclass(frozen=True)
class CifarFormat:
    """Where torchvision keeps one CIFAR variant and how its pickles are laid out."""

    name: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    torchvision_class: str


CIFAR_FORMATS = {
    "cifar100": CifarFormat(
        name="CIFAR-100",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        label_key="fine_labels",
        num_classes=100,
        mean=(0.5071, 0.4867, 0.4408),
        std=(0.2675, 0.2565, 0.2761),
        torchvision_class="CIFAR100",
    ),
    "cifar10": CifarFormat(
        name="CIFAR-10",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key="labels",
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        torchvision_class="CIFAR10",
    ),
}


def _download(fmt: CifarFormat, root: str) -> None:
    import torchvision

    dataset_class = getattr(torchvision.datasets, fmt.torchvision_class)
    try:
        for train in (True, False):
            dataset_class(root, train=train, download=True)
    except Exception as exc:  # network errors come in many types
        raise MdistillerError(
            f"downloading {fmt.name} into {root} failed ({type(exc).__name__}: {str(exc)[:100]}); "
            f"put torchvision's {fmt.folder} folder under DATASET.ROOT by hand"
        ) from None


def check_cifar_present(dataset_type: str, root: str, download: bool) -> str:
    """The data folder of `dataset_type` under root; a missing one is an error unless it may be downloaded."""
    fmt = CIFAR_FORMATS[dataset_type]
    folder = os.path.join(root, fmt.folder)
    if not os.path.isdir(folder) and not download:
        raise MdistillerError(
            f"{fmt.name} not found: no folder {folder}. Put torchvision's {fmt.folder} folder under DATASET.ROOT "
            f"(or the MDISTILLER_DATA environment variable), or set DATASET.DOWNLOAD True"
        )
    return folder


def ensure_cifar(dataset_type: str, root: str, download: bool) -> str:
    """Return the data folder of `dataset_type` under root, downloading it through torchvision if asked."""
    folder = check_cifar_present(dataset_type, root, download)
    if not os.path.isdir(folder):
        _download(CIFAR_FORMATS[dataset_type], root)
    return folder


def _read_pickle(path: str) -> dict:
    if not os.path.isfile(path):
        raise MdistillerError(f"CIFAR data file missing: {path}")
    try:
        with open(path, "rb") as f:
            # The official files are Python 2 pickles with byte-string keys; latin1 is what torchvision uses.
            entry = pickle.load(f, encoding="latin1")
    except Exception as exc:  # truncated or corrupt: EOFError, UnpicklingError, ValueError, ...
        raise MdistillerError(f"CIFAR data file {path} is truncated or corrupt ({type(exc).__name__})") from None
    if not isinstance(entry, dict):
        raise MdistillerError(f"CIFAR data file {path} holds a {type(entry).__name__}, not a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _read_file(path: str, fmt: CifarFormat) -> tuple[np.ndarray, np.ndarray]:
    entry = _read_pickle(path)
    for key in ("data", fmt.label_key):
        if key not in entry:
            raise MdistillerError(f"CIFAR data file {path} has no '{key}' entry (is it a {fmt.name} file?)")
    data = np.asarray(entry["data"])
    labels = np.asarray(entry[fmt.label_key])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise MdistillerError(f"CIFAR data file {path}: 'data' has shape {data.shape}, expected (N, 3072)")
    if data.dtype != np.uint8:
        raise MdistillerError(f"CIFAR data file {path}: 'data' is {data.dtype}, expected uint8")
    if labels.ndim != 1 or len(labels) != len(data):
        raise MdistillerError(f"CIFAR data file {path}: {len(labels)} labels for {len(data)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= fmt.num_classes):
        raise MdistillerError(
            f"CIFAR data file {path}: labels span {labels.min()}..{labels.max()}, outside 0..{fmt.num_classes - 1}"
        )
    return data, labels.astype(np.int64)


def read_cifar_split(dataset_type: str, folder: str, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 (N, 32, 32, 3) HWC and labels as int64 (N,), validated."""
    fmt = CIFAR_FORMATS[dataset_type]
    parts = [_read_file(os.path.join(folder, name), fmt) for name in (fmt.train_files if train else fmt.test_files)]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if len(data) == 0:
        raise MdistillerError(f"{fmt.name} {'train' if train else 'test'} split in {folder} is empty")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels
