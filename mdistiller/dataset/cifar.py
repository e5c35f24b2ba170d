"""CIFAR-10/100 from torchvision's on-disk pickle formats, validated by structure rather than checksums.

torchvision's own CIFAR classes verify the MD5 sums of the extracted files and so reject any re-packed copy
(including the small files the tests write); this reader parses the same format and checks shapes, label range and
counts instead, with errors that say what is wrong and where.

A missing folder is downloaded (DATASET.DOWNLOAD, on by default as upstream): the official archive at the URL
torchvision's dataset class names, checked against torchvision's MD5, fetched with mdistiller.download (resumable,
time-limited, one process at a time) and extracted next to its final place, then renamed into it.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import torchvision
from torchvision.datasets.utils import calculate_md5

from .. import download
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


def _torchvision_archive(fmt: CifarFormat) -> tuple[str, str, str]:
    """(URL, file name, MD5) of the official archive, as torchvision's dataset class declares them."""
    dataset_class = getattr(torchvision.datasets, fmt.torchvision_class)
    return dataset_class.url, dataset_class.filename, dataset_class.tgz_md5


def _where_to_put_it(fmt: CifarFormat) -> str:
    return f"Put torchvision's {fmt.folder} folder under DATASET.ROOT (or the MDISTILLER_DATA environment variable)"


def _download_and_extract(fmt: CifarFormat, root: str, folder: str) -> None:
    """Fetch (or reuse) the official archive in root, check its MD5, extract it next to `folder`, rename it there."""
    url, filename, md5 = _torchvision_archive(fmt)
    archive = os.path.join(root, filename)
    downloaded = not os.path.isfile(archive)
    if downloaded:
        try:
            download.fetch(url, archive, fmt.name)
        except MdistillerError as exc:
            raise MdistillerError(f"{fmt.name} not found: no folder {folder}, and {exc}. {_where_to_put_it(fmt)}, "
                                  f"or its archive {filename}") from None
    actual = calculate_md5(archive)
    if actual != md5:
        if downloaded:  # damaged on the way (or the mirror changed): do not keep it for the next run
            os.remove(archive)
            raise MdistillerError(f"the {fmt.name} archive downloaded from {url} has MD5 {actual}, not {md5}: "
                                  f"deleted it; run again to download it afresh")
        raise MdistillerError(f"{fmt.name} archive {archive} is damaged (MD5 {actual}, expected {md5}): delete it "
                              f"to download it again, or replace it")
    staging = tempfile.mkdtemp(prefix=f".{fmt.folder}.", suffix=".extracting", dir=root)
    try:
        download.extract_tar(archive, staging, f"{fmt.name} archive")
        extracted = os.path.join(staging, fmt.folder)
        if not os.path.isdir(extracted):
            raise MdistillerError(f"{fmt.name} archive {archive} holds no {fmt.folder} folder")
        os.replace(extracted, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_cifar_present(dataset_type: str, root: str, download_missing: bool) -> str:
    """The data folder of `dataset_type` under root; a missing one is an error unless it may be downloaded."""
    fmt = CIFAR_FORMATS[dataset_type]
    folder = os.path.join(root, fmt.folder)
    if not os.path.isdir(folder) and not download_missing:
        raise MdistillerError(
            f"{fmt.name} not found: no folder {folder}. {_where_to_put_it(fmt)}, or set DATASET.DOWNLOAD True"
        )
    return folder


def ensure_cifar(dataset_type: str, root: str, download_missing: bool) -> str:
    """Return the data folder of `dataset_type` under root; a missing folder is downloaded (torchvision's URL and
    MD5) when `download_missing`, by one process at a time (a file lock in root), the others waiting for it. A
    download that fails leaves no lock behind, nor a root folder it created (unless it keeps a part to resume).

    A folder already present is never touched: damaged files in it are reported by name when read.
    """
    fmt = CIFAR_FORMATS[dataset_type]
    folder = check_cifar_present(dataset_type, root, download_missing)
    if os.path.isdir(folder):
        return folder
    try:
        lock = download.file_lock(os.path.join(root, f".{fmt.folder}.lock"),
                                  waiting=f"waiting for another process to download {fmt.name} into {root}")
        with lock:
            if not os.path.isdir(folder):  # another process may have finished it while this one waited
                _download_and_extract(fmt, root, folder)
    except OSError as exc:  # a read-only or full DATASET.ROOT
        raise MdistillerError(f"{fmt.name} not found: no folder {folder}, and it cannot be written there "
                              f"({exc.strerror or exc}). {_where_to_put_it(fmt)}") from None
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
