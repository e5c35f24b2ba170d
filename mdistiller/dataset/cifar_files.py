"""Write CIFAR data sets in torchvision's exact on-disk formats (the same pickles the official archives hold).

The tests write small learnable sets with it; tools/bench.py writes a full-size set of random images when the real
CIFAR-100 is absent.
"""

from __future__ import annotations

import os
import pickle

import numpy as np


def _dump(path: str, entry: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def _rows(images: np.ndarray) -> np.ndarray:
    """N x 32 x 32 x 3 (HWC) -> N x 3072 in CIFAR's channel-planar row order."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)


def learnable_images(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Noisy images whose mean colour and a bright quadrant depend on the label, so a small CNN can learn them."""
    n = len(labels)
    palette = rng.integers(40, 216, size=(num_classes, 3))
    images = rng.normal(0, 30, size=(n, 32, 32, 3)) + palette[labels][:, None, None, :]
    quadrant = labels % 4
    for q in range(4):
        sel = quadrant == q
        r, c = divmod(q, 2)
        images[sel, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16, :] += 60
    return np.clip(images, 0, 255).astype(np.uint8)


def random_images(n: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform random uint8 HWC images: cheap at full CIFAR size (the learnable ones need float64 buffers)."""
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def write_cifar100(root: str, n_train: int = 256, n_test: int = 128, classes_used: int = 100, seed: int = 0,
                   images: dict | None = None, learnable: bool = True) -> str:
    """`root/cifar-100-python/{train,test,meta}` as torchvision reads them; labels in 0..classes_used-1.

    `images` gives each split's (images, labels) explicitly; otherwise they are drawn, learnable or uniform noise.
    """
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        if images is not None:
            x, y = images[split]
        else:
            y = rng.integers(0, classes_used, size=n)
            x = learnable_images(y, 100, rng) if learnable else random_images(n, rng)
        _dump(os.path.join(folder, split), {
            "filenames": [f"img_{i}.png" for i in range(len(y))], "batch_label": f"{split} batch",
            "fine_labels": [int(v) for v in y], "coarse_labels": [int(v) // 5 for v in y], "data": _rows(x),
        })
    _dump(os.path.join(folder, "meta"), {"fine_label_names": [f"c{i}" for i in range(100)],
                                         "coarse_label_names": [f"s{i}" for i in range(20)]})
    return folder


def write_cifar10(root: str, n_per_batch: int = 40, n_test: int = 64, seed: int = 0, learnable: bool = True) -> str:
    """`root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_per_batch
        y = rng.integers(0, 10, size=n)
        x = learnable_images(y, 10, rng) if learnable else random_images(n, rng)
        _dump(os.path.join(folder, name), {"batch_label": name, "labels": [int(v) for v in y], "data": _rows(x),
                                           "filenames": [f"{i}.png" for i in range(n)]})
    _dump(os.path.join(folder, "batches.meta"), {"label_names": [f"c{i}" for i in range(10)],
                                                 "num_cases_per_batch": n_per_batch, "num_vis": 3072})
    return folder


def write_cifar(dataset_type: str, root: str, n_train: int, n_test: int, seed: int = 0,
                learnable: bool = True) -> str:
    """A set of DATASET.TYPE cifar100 / cifar10 with about n_train / n_test images (CIFAR-10: 5 equal batches)."""
    if dataset_type == "cifar10":
        return write_cifar10(root, n_per_batch=-(-n_train // 5), n_test=n_test, seed=seed, learnable=learnable)
    return write_cifar100(root, n_train=n_train, n_test=n_test, seed=seed, learnable=learnable)
