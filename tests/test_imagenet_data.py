"""ImageNet data: the ImageFolder layout, its transforms and views, and the errors a broken folder gives."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mdistiller.dataset import IMAGENET_VIEWS, TRAIN_VIEWS, get_dataset, get_test_set, num_classes_of
from mdistiller.dataset.imagenet import RangeRandAugment, imagenet_test_transform
from mdistiller.engine.cfg import default_cfg
from mdistiller.errors import MdistillerError

WNIDS = ("n01440764", "n01443537", "n01484850")


def write_imagenet(root: str, n_train: int = 8, n_val: int = 4, size: int = 40, wnids=WNIDS, seed: int = 0) -> str:
    """`root/imagenet/{train,val}/<wnid>/*.JPEG`: real JPEG files whose colour depends on the class."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, wnid in enumerate(wnids):
            folder = os.path.join(root, "imagenet", split, wnid)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                colour = np.array([60 + 70 * (c % 3), 200 - 60 * (c % 3), 40 + 50 * (c // 3)], dtype=float)
                pixels = np.clip(colour + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{wnid}_{i}.JPEG"), quality=90)
    return root


def imagenet_cfg(root: str, image_size: int = 32, batch: int = 8):
    cfg = default_cfg()
    cfg.DATASET.TYPE = "imagenet"
    cfg.DATASET.ROOT = root
    cfg.DATASET.IMAGE_SIZE = image_size
    cfg.DATASET.NUM_WORKERS = 0
    cfg.SOLVER.BATCH_SIZE = batch
    cfg.DATASET.TEST.BATCH_SIZE = batch
    return cfg


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> str:
    return write_imagenet(str(tmp_path_factory.mktemp("imagenet_data")))


@pytest.fixture
def own_root(tmp_path) -> str:
    """A fresh copy the test may damage."""
    return write_imagenet(str(tmp_path), n_train=2, n_val=1)


def test_loads_the_imagefolder_layout_as_mdistiller_batches(imagenet_root):
    torch.manual_seed(0)
    train_loader, val_loader, num_train, num_classes = get_dataset(imagenet_cfg(imagenet_root), seed=0)
    assert (num_train, num_classes) == (24, 3)
    batch = next(iter(train_loader))
    assert set(batch) == {"image", "target", "index"}  # the skipped-file bookkeeping never leaves the loader
    assert batch["image"].shape == (8, 3, 32, 32) and batch["target"].dtype == torch.long
    targets = torch.cat([b["target"] for b in val_loader])
    assert targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4  # sorted class folders -> class index, val in order
    assert next(iter(val_loader))["image"].shape == (8, 3, 32, 32)
    assert len(get_test_set(imagenet_cfg(imagenet_root))) == 12


def test_class_count_is_the_number_of_class_folders_checked_against_num_classes(imagenet_root):
    cfg = imagenet_cfg(imagenet_root)
    assert num_classes_of(cfg) == 3
    cfg.DATASET.NUM_CLASSES = 1000  # what the published configs say
    with pytest.raises(MdistillerError, match="DATASET.NUM_CLASSES is 1000 but imagenet has 3 classes"):
        num_classes_of(cfg)


def test_test_transform_resizes_by_256_over_224_then_center_crops():
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    assert "Resize(size=256" in repr(imagenet_test_transform(mean, std, 224))
    assert "CenterCrop(size=(224, 224))" in repr(imagenet_test_transform(mean, std, 224))
    small = imagenet_test_transform(mean, std, 32)
    assert "Resize(size=37" in repr(small)  # round(32 * 256 / 224)
    assert small(Image.new("RGB", (60, 40))).shape == (3, 32, 32)


def test_mlkd_views_have_imagenet_versions_and_cifar_views_are_unchanged(imagenet_root):
    views = {"image_weak": "standard", "image_strong": "strong"}
    train_loader, _, _, _ = get_dataset(imagenet_cfg(imagenet_root, image_size=24), views, seed=0)
    batch = next(iter(train_loader))
    assert batch["image_weak"].shape == batch["image_strong"].shape == (8, 3, 24, 24)
    assert not torch.equal(batch["image_weak"], batch["image_strong"])
    assert {"standard", "strong", "test"} <= set(IMAGENET_VIEWS)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    cifar_strong = TRAIN_VIEWS["strong"](mean, std)  # CIFAR's builders keep their (mean, std) signature
    assert cifar_strong(Image.new("RGB", (32, 32))).shape == (3, 32, 32)


def test_imagenet_strong_augment_is_seeded_by_torch():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8))
    augment = RangeRandAugment(n=2)
    torch.manual_seed(5)
    first = [np.asarray(augment(img)) for _ in range(6)]
    torch.manual_seed(5)
    second = [np.asarray(augment(img)) for _ in range(6)]
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert any(not np.array_equal(a, np.asarray(img)) for a in first)


def test_a_view_without_an_imagenet_version_is_named(imagenet_root):
    with pytest.raises(MdistillerError, match="training view 'sobel' has no ImageNet version"):
        get_dataset(imagenet_cfg(imagenet_root), {"image": "sobel"})


def test_missing_root_says_the_expected_layout(tmp_path):
    with pytest.raises(MdistillerError, match=r"ImageNet not found: no folder .*imagenet/train\. Expected layout "
                                              r"<DATASET.ROOT>/imagenet/\{train,val\}/<wnid>/\*\.JPEG"):
        num_classes_of(imagenet_cfg(str(tmp_path)))


def test_no_class_folders(tmp_path):
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    (tmp_path / "imagenet" / "val").mkdir()
    with pytest.raises(MdistillerError, match=r"no class folders in .*imagenet/train\. Expected layout"):
        num_classes_of(imagenet_cfg(str(tmp_path)))


def test_val_images_not_sorted_into_class_folders_get_a_hint(own_root):
    val = Path(own_root) / "imagenet" / "val"
    for folder in list(val.iterdir()):
        for image in folder.iterdir():
            image.rename(val / image.name)
        folder.rmdir()
    with pytest.raises(MdistillerError, match="the images lie directly in it: sort them into one folder per class"):
        num_classes_of(imagenet_cfg(own_root))


def test_train_and_val_class_sets_that_differ_are_named(own_root):
    val = Path(own_root) / "imagenet" / "val"
    shutil.rmtree(val / WNIDS[2])
    (val / "n09999999").mkdir()
    with pytest.raises(MdistillerError, match=r"class folders differ .*: 1 only in train \(n01484850\); "
                                              r"1 only in val \(n09999999\)"):
        get_dataset(imagenet_cfg(own_root))


def _corrupt_one_image(root: str) -> str:
    path = os.path.join(root, "imagenet", "train", WNIDS[1], f"{WNIDS[1]}_0.JPEG")
    with open(path, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return path


@pytest.mark.parametrize("workers", [0, 1])
def test_an_unreadable_image_is_named(own_root, workers):
    bad = _corrupt_one_image(own_root)
    cfg = imagenet_cfg(own_root, batch=2)
    cfg.DATASET.NUM_WORKERS = workers
    train_loader, _, _, _ = get_dataset(cfg, seed=0)
    with pytest.raises(MdistillerError) as info:
        for _ in train_loader:
            pass
    message = str(info.value)
    assert f"unreadable image {bad}" in message and "DATASET.SKIP_BAD_IMAGES True" in message
    assert "\n" not in message  # a worker's traceback is reduced to the message


@pytest.mark.slow
def test_skip_bad_images_skips_counts_and_reports(own_root, capsys):
    bad = _corrupt_one_image(own_root)
    cfg = imagenet_cfg(own_root, batch=2)
    cfg.DATASET.SKIP_BAD_IMAGES = True
    train_loader, _, num_train, _ = get_dataset(cfg, seed=0)
    for _ in range(2):
        batches = list(train_loader)
        assert sum(len(b["target"]) for b in batches) == num_train == 6  # the next readable image takes its place
    assert train_loader.skipped_images == 2 and train_loader.skipped_files == [bad]
    err = capsys.readouterr().err  # a fallback: a warning
    assert err.count("warning: DATASET.SKIP_BAD_IMAGES: skipped 1 unreadable image(s)") == 2 and bad in err
