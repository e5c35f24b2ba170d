"""CIFAR readers: torchvision's on-disk formats, structural validation, clear errors, the train/test transforms."""

from __future__ import annotations

import os
import pickle
import re

import numpy as np
import pytest
import torch

from mdistiller.dataset import get_dataset, num_classes_of
from mdistiller.dataset.cifar import read_cifar_split
from mdistiller.engine.cfg import default_cfg
from mdistiller.errors import MdistillerError

from cifar_files import write_cifar10, write_cifar100


def _cfg(root: str, dataset: str = "cifar100", batch: int = 16):
    cfg = default_cfg()
    cfg.DATASET.TYPE = dataset
    cfg.DATASET.ROOT = root
    cfg.DATASET.NUM_WORKERS = 0
    cfg.SOLVER.BATCH_SIZE = batch
    return cfg


def test_cifar100_pixels_and_labels_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = {split: (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 100, n))
              for split, n in (("train", 20), ("test", 10))}
    folder = write_cifar100(str(tmp_path), images=images)
    x, y = read_cifar_split("cifar100", folder, train=True)
    assert x.shape == (20, 32, 32, 3) and x.dtype == np.uint8
    np.testing.assert_array_equal(x, images["train"][0])
    np.testing.assert_array_equal(y, images["train"][1])


def test_official_python2_style_pickles_with_byte_keys_are_read(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.zeros((3, 3072), dtype=np.uint8)
    for split in ("train", "test"):
        with open(folder / split, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": [1, 2, 3], b"coarse_labels": [0, 0, 0]}, f, protocol=2)
    x, y = read_cifar_split("cifar100", str(folder), train=False)
    assert x.shape == (3, 32, 32, 3) and list(y) == [1, 2, 3]


def test_cifar10_layout_and_class_count(tmp_path):
    write_cifar10(str(tmp_path), n_per_batch=8, n_test=6)
    cfg = _cfg(str(tmp_path), "cifar10", batch=8)
    train_loader, val_loader, num_train, num_classes = get_dataset(cfg)
    assert (num_train, num_classes, len(val_loader.dataset)) == (40, 10, 6)


def test_loader_batches_are_normalised_dicts(cifar100_root):
    cfg = _cfg(cifar100_root)
    train_loader, val_loader, num_train, num_classes = get_dataset(cfg)
    batch = next(iter(train_loader))
    assert set(batch) == {"image", "target", "index"}
    assert batch["image"].shape == (16, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert num_classes == 100 and num_train == 256
    test_batch = next(iter(val_loader))
    # normalised: roughly centred, not in [0, 1]
    assert test_batch["image"].min() < 0 < test_batch["image"].max()


def test_train_augmentation_is_crop_and_flip_of_the_test_view(cifar100_root):
    """Every train view equals the normalised test image shifted by at most 4 pixels (zero padded), maybe flipped."""
    cfg = _cfg(cifar100_root)
    train_set = get_dataset(cfg)[0].dataset
    test_view = get_dataset(cfg)[1].dataset.views["image"]
    from PIL import Image

    mean = torch.tensor([0.5071, 0.4867, 0.4408]).view(3, 1, 1)
    std = torch.tensor([0.2675, 0.2565, 0.2761]).view(3, 1, 1)
    torch.manual_seed(0)
    for index in range(5):
        augmented = train_set[index]["image"]
        clean = test_view(Image.fromarray(train_set.images[index]))
        padded = torch.nn.functional.pad(clean * std + mean, (4, 4, 4, 4))  # zero padding in pixel space
        padded = (padded - mean) / std
        matches = [
            torch.allclose(augmented, view[:, dy:dy + 32, dx:dx + 32], atol=1e-5)
            for view in (padded, padded.flip(-1))
            for dy in range(9)
            for dx in range(9)
        ]
        assert any(matches)


def test_seeded_loader_order_is_reproducible(cifar100_root):
    cfg = _cfg(cifar100_root)
    first = [b["index"].tolist() for b in get_dataset(cfg, seed=3)[0]]
    again = [b["index"].tolist() for b in get_dataset(cfg, seed=3)[0]]
    other = [b["index"].tolist() for b in get_dataset(cfg, seed=4)[0]]
    assert first == again and first != other
    assert sorted(i for b in first for i in b) == list(range(256))  # without replacement, whole epoch


def test_missing_folder_names_the_path_and_the_fix(tmp_path):
    cfg = _cfg(str(tmp_path / "nowhere"))
    cfg.DATASET.DOWNLOAD = False
    with pytest.raises(MdistillerError, match=r"CIFAR-100 not found: no folder .*cifar-100-python.*DATASET.DOWNLOAD"):
        get_dataset(cfg)


def test_offline_the_missing_folder_is_one_line_saying_where_to_put_it(tmp_path):
    """DATASET.DOWNLOAD is on by default; the suite runs with MDISTILLER_OFFLINE set (conftest), as CI is offline."""
    assert default_cfg().DATASET.DOWNLOAD is True
    with pytest.raises(MdistillerError) as info:
        get_dataset(_cfg(str(tmp_path / "nowhere")))
    message = str(info.value)
    assert "\n" not in message
    assert re.match(r"CIFAR-100 not found: no folder .*nowhere/cifar-100-python, and downloading CIFAR-100 from "
                    r"https://www.cs.toronto.edu/\S+ failed \(MDISTILLER_OFFLINE is set", message), message
    assert "Put torchvision's cifar-100-python folder under DATASET.ROOT" in message
def test_truncated_file(tmp_path):
    folder = write_cifar100(str(tmp_path), n_train=32, n_test=8)
    path = os.path.join(folder, "train")
    with open(path, "rb") as f:
        head = f.read(os.path.getsize(path) // 2)
    with open(path, "wb") as f:
        f.write(head)
    with pytest.raises(MdistillerError, match="train is truncated or corrupt"):
        get_dataset(_cfg(str(tmp_path)))


@pytest.mark.parametrize("problem,message", [
    ("shape", r"'data' has shape \(4, 100\), expected \(N, 3072\)"),
    ("labels", r"labels span 0..100, outside 0..99"),
    ("count", r"3 labels for 4 images"),
    ("dtype", r"'data' is float64, expected uint8"),
    ("key", r"no 'fine_labels' entry"),
])
def test_structural_errors(tmp_path, problem, message):
    folder = write_cifar100(str(tmp_path), n_train=8, n_test=4)
    entry = {"data": np.zeros((4, 3072), np.uint8), "fine_labels": [0, 1, 2, 3]}
    if problem == "shape":
        entry["data"] = np.zeros((4, 100), np.uint8)
    elif problem == "labels":
        entry["fine_labels"] = [0, 1, 2, 100]
    elif problem == "count":
        entry["fine_labels"] = [0, 1, 2]
    elif problem == "dtype":
        entry["data"] = np.zeros((4, 3072))
    elif problem == "key":
        entry = {"data": entry["data"], "labels": [0, 1, 2, 3]}
    with open(os.path.join(folder, "test"), "wb") as f:
        pickle.dump(entry, f)
    with pytest.raises(MdistillerError, match=message):
        get_dataset(_cfg(str(tmp_path)))


def test_missing_split_file(tmp_path):
    folder = write_cifar10(str(tmp_path), n_per_batch=4, n_test=4)
    os.remove(os.path.join(folder, "data_batch_3"))
    with pytest.raises(MdistillerError, match="CIFAR data file missing: .*data_batch_3"):
        get_dataset(_cfg(str(tmp_path), "cifar10"))


def test_num_classes_must_agree_with_the_data_set():
    cfg = _cfg("unused")
    cfg.DATASET.NUM_CLASSES = 1000
    with pytest.raises(MdistillerError, match="DATASET.NUM_CLASSES is 1000 but cifar100 has 100 classes"):
        num_classes_of(cfg)
    cfg.DATASET.TYPE = "svhn"
    with pytest.raises(MdistillerError, match="unknown DATASET.TYPE 'svhn'"):
        num_classes_of(cfg)
