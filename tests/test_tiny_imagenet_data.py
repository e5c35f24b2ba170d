"""Tiny-ImageNet data: the official zip's layout (and mdistiller's sorted val/), transforms, loaders, errors."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from mdistiller.dataset import TINY_IMAGENET_VIEWS, get_dataset, get_test_set, num_classes_of
from mdistiller.dataset.tiny_imagenet import (
    TINY_IMAGENET_MEAN,
    TINY_IMAGENET_STD,
    tiny_imagenet_test_transform,
    tiny_imagenet_train_transform,
)
from mdistiller.engine.cfg import default_cfg
from mdistiller.errors import MdistillerError
from mdistiller.log import run_log

# Official wnids.txt is not sorted; class indices follow the sorted train folder names, as in ImageFolder.
WNIDS = ("n02124075", "n01443537", "n04067472", "n01629819")


def _colour(c: int) -> np.ndarray:
    return np.array([60 + 70 * (c % 3), 200 - 60 * (c % 3), 40 + 50 * (c // 3 % 4)], dtype=float)


def _write_jpeg(path: str, c: int, rng: np.random.Generator, grey: bool = False) -> None:
    pixels = np.clip(_colour(c) + rng.normal(0, 25, (64, 64, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    (image.convert("L") if grey else image).save(path, quality=90)


def write_tiny_imagenet(root: str, wnids=WNIDS, n_train: int = 6, n_val: int = 3, val_layout: str = "official",
                        seed: int = 0) -> str:
    """`root/tiny-imagenet-200` as the official zip has it (wnids.txt, words.txt, train/<wnid>/images/*.JPEG with
    <wnid>_boxes.txt, val/images/*.JPEG with val_annotations.txt, test/images/), or with val_layout "sorted" the
    validation images in val/<wnid>/images/ (what mdistiller reads). Real 64x64 JPEGs, colour by class (index in
    `wnids`); the first training image of each class is greyscale, as some of the official ones are."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "tiny-imagenet-200")
    os.makedirs(base, exist_ok=True)
    with open(os.path.join(base, "wnids.txt"), "w") as f:
        f.writelines(f"{w}\n" for w in wnids)
    with open(os.path.join(base, "words.txt"), "w") as f:
        f.writelines(f"{w}\tthing number {i}\n" for i, w in enumerate(wnids))
    for c, wnid in enumerate(wnids):
        folder = os.path.join(base, "train", wnid, "images")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(base, "train", wnid, f"{wnid}_boxes.txt"), "w") as boxes:
            for i in range(n_train):
                _write_jpeg(os.path.join(folder, f"{wnid}_{i}.JPEG"), c, rng, grey=i == 0)
                boxes.write(f"{wnid}_{i}.JPEG\t0\t0\t63\t63\n")
    val = os.path.join(base, "val")
    order = [c for c in range(len(wnids)) for _ in range(n_val)]
    rng.shuffle(order)  # the official val_annotations.txt mixes the classes
    lines = []
    for k, c in enumerate(order):
        folder = os.path.join(val, "images") if val_layout == "official" else os.path.join(val, wnids[c], "images")
        os.makedirs(folder, exist_ok=True)
        _write_jpeg(os.path.join(folder, f"val_{k}.JPEG"), c, rng)
        lines.append(f"val_{k}.JPEG\t{wnids[c]}\t3\t5\t60\t62\n")
    with open(os.path.join(val, "val_annotations.txt"), "w") as f:
        f.writelines(lines)
    os.makedirs(os.path.join(base, "test", "images"), exist_ok=True)
    _write_jpeg(os.path.join(base, "test", "images", "test_0.JPEG"), 0, rng)
    return root


def tiny_cfg(root: str, batch: int = 8):
    cfg = default_cfg()
    cfg.DATASET.TYPE = "tiny_imagenet"
    cfg.DATASET.ROOT = root
    cfg.DATASET.NUM_WORKERS = 0
    cfg.SOLVER.BATCH_SIZE = batch
    cfg.DATASET.TEST.BATCH_SIZE = batch
    return cfg


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> str:
    return write_tiny_imagenet(str(tmp_path_factory.mktemp("tiny_imagenet")))


@pytest.fixture
def own_root(tmp_path) -> str:
    """A fresh small copy the test may damage."""
    return write_tiny_imagenet(str(tmp_path), n_train=2, n_val=1)


def _sorted_targets(wnids) -> dict[str, int]:
    return {w: i for i, w in enumerate(sorted(wnids))}


def test_reads_the_official_zip_layout_as_mdistiller_batches(tiny_root):
    torch.manual_seed(0)
    train_loader, val_loader, num_train, num_classes = get_dataset(tiny_cfg(tiny_root), seed=0)
    assert (num_train, num_classes) == (24, 4)
    batch = next(iter(train_loader))
    assert set(batch) == {"image", "target", "index"}
    assert batch["image"].shape == (8, 3, 64, 64) and batch["target"].dtype == torch.long
    # every training label is the sorted-folder index of the file's class (not its wnids.txt line)
    train_set = train_loader.dataset
    index = _sorted_targets(WNIDS)
    assert all(target == index[os.path.basename(path).split("_")[0]] for path, target in train_set.samples)
    assert all(os.sep + "images" + os.sep in path for path, _ in train_set.samples)  # boxes.txt files are not read
    val = [b for b in val_loader]
    targets = torch.cat([b["target"] for b in val])
    assert targets.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3  # by class then file name, like ImageFolder
    assert val[0]["image"].shape == (8, 3, 64, 64)


def test_validation_labels_come_from_val_annotations(tiny_root):
    test_set = get_test_set(tiny_cfg(tiny_root))
    base = os.path.join(tiny_root, "tiny-imagenet-200", "val")
    with open(os.path.join(base, "val_annotations.txt")) as f:
        listed = {line.split("\t")[0]: line.split("\t")[1] for line in f}
    index = _sorted_targets(WNIDS)
    assert len(test_set) == 12
    assert {os.path.basename(p): t for p, t in test_set.samples} == {n: index[w] for n, w in listed.items()}
    # the colour of each image is its annotated class's (the file really is that class's)
    item = test_set[5]
    mean_rgb = item["image"].mean(dim=(1, 2)) * torch.tensor(TINY_IMAGENET_STD) + torch.tensor(TINY_IMAGENET_MEAN)
    expected = torch.tensor(_colour(WNIDS.index(sorted(WNIDS)[item["target"]])) / 255, dtype=torch.float32)
    assert torch.allclose(mean_rgb, expected, atol=0.05)


def test_mdistillers_sorted_val_folders_give_the_same_samples_in_the_same_order(tmp_path, tiny_root):
    sorted_root = write_tiny_imagenet(str(tmp_path), val_layout="sorted")
    official = get_test_set(tiny_cfg(tiny_root))
    resorted = get_test_set(tiny_cfg(sorted_root))
    assert [(os.path.basename(p), t) for p, t in official.samples] == \
        [(os.path.basename(p), t) for p, t in resorted.samples]
    assert torch.equal(official[0]["image"], resorted[0]["image"])


def test_class_count_follows_the_train_folders_and_wnids_checked_against_num_classes(tmp_path, tiny_root):
    wnids = [f"n{1000000 + 37 * i:08d}" for i in range(200)]
    root = write_tiny_imagenet(str(tmp_path), wnids=wnids, n_train=1, n_val=1)
    cfg = tiny_cfg(root)
    cfg.DATASET.NUM_CLASSES = 200  # what configs/tiny_imagenet/* say
    assert num_classes_of(cfg) == 200
    test_set = get_test_set(cfg)
    assert sorted(t for _, t in test_set.samples) == list(range(200))
    small = tiny_cfg(tiny_root)
    small.DATASET.NUM_CLASSES = 200
    with pytest.raises(MdistillerError, match="DATASET.NUM_CLASSES is 200 but tiny_imagenet has 4 classes"):
        num_classes_of(small)


def test_train_transform_rotates_up_to_20_degrees_uniformly_and_flips_half():
    torch.manual_seed(0)
    transform = tiny_imagenet_train_transform((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    white_left = np.zeros((64, 64, 3), dtype=np.uint8)
    white_left[:, :32] = 255
    flips = 0
    for _ in range(300):
        out = transform(Image.fromarray(white_left))
        assert out.shape == (3, 64, 64) and out.dtype == torch.float32
        flips += bool(out[:, 24:40, 40:60].mean() > out[:, 24:40, 4:24].mean())  # the bright half moved right
    assert 0.4 < flips / 300 < 0.6

    # Rotating a white image leaves black corners whose area grows with |angle|: |angle| ~ U(0, 20) puts half the
    # draws below the area at 10 degrees and none above the area at 20.
    white = Image.new("RGB", (64, 64), "white")

    def black_area(image: Image.Image) -> float:
        return float((TF.to_tensor(image).sum(0) == 0).float().mean())

    rotation = transform.transforms[0]
    areas = [black_area(rotation(white)) for _ in range(300)]
    assert max(areas) <= black_area(TF.rotate(white, 20.0)) + 1e-6
    assert 0.4 < sum(a < black_area(TF.rotate(white, 10.0)) for a in areas) / 300 < 0.6
    assert min(areas) < black_area(TF.rotate(white, 2.0))


def test_test_transform_normalises_with_mdistillers_mean_and_std():
    transform = tiny_imagenet_test_transform(TINY_IMAGENET_MEAN, TINY_IMAGENET_STD)
    image = Image.new("RGB", (64, 64), (10, 128, 250))
    out = transform(image)
    expected = (torch.tensor([10, 128, 250]) / 255 - torch.tensor([0.4802, 0.4481, 0.3975])) / torch.tensor(
        [0.2302, 0.2265, 0.2262])
    assert out.shape == (3, 64, 64)
    assert torch.allclose(out[:, 7, 9], expected, atol=1e-6)
    assert set(TINY_IMAGENET_VIEWS) >= {"standard", "test"}


def test_same_seed_same_batches_and_torchrun_ranks_split_each_global_batch(tiny_root):
    cfg = tiny_cfg(tiny_root)
    one = [b["index"].tolist() for b in get_dataset(cfg, seed=3)[0]]
    again = [b["index"].tolist() for b in get_dataset(cfg, seed=3)[0]]
    assert one == again and sorted(sum(one, [])) == list(range(24))
    ranks = [[b["index"].tolist() for b in get_dataset(cfg, seed=3, rank=r, world_size=2)[0]] for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == one  # the one-process global batches, cut in two
    vals = [torch.cat([b["target"] for b in get_dataset(cfg, seed=3, rank=r, world_size=2)[1]]) for r in (0, 1)]
    assert torch.cat(vals).tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3


def test_restoring_the_sampler_generator_and_torch_rng_replays_an_epochs_augmented_batches(tiny_root):
    """What resume restores (the loader's generator, torch's RNG) fixes the order and every rotation and flip."""
    loader = get_dataset(tiny_cfg(tiny_root), seed=5)[0]
    torch.manual_seed(11)
    states = loader.generator.get_state(), torch.get_rng_state()
    first = [(b["index"], b["image"]) for b in loader]
    next(iter(loader))  # move both on
    loader.generator.set_state(states[0])
    torch.set_rng_state(states[1])
    again = [(b["index"], b["image"]) for b in loader]
    assert all(torch.equal(i, j) and torch.equal(x, y) for (i, x), (j, y) in zip(first, again))
    assert len(first) == 3
    unrestored = [b["image"] for b in loader]  # the next epoch: another order and other augmentations
    assert not any(torch.equal(x, y) for (_, x), y in zip(first, unrestored))


def test_a_view_without_a_tiny_imagenet_version_is_named(tiny_root):
    with pytest.raises(MdistillerError, match="training view 'strong' has no Tiny-ImageNet version"):
        get_dataset(tiny_cfg(tiny_root), {"image": "standard", "image_strong": "strong"})


def test_image_size_other_than_64_is_refused(tiny_root):
    cfg = tiny_cfg(tiny_root)
    cfg.DATASET.IMAGE_SIZE = 32
    with pytest.raises(MdistillerError, match="DATASET.IMAGE_SIZE 32 does not apply to tiny_imagenet"):
        get_dataset(cfg)


def _one_line_error(cfg) -> str:
    with pytest.raises(MdistillerError) as info:
        get_dataset(cfg)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_root_names_the_folder_and_the_zip(tmp_path):
    message = _one_line_error(tiny_cfg(str(tmp_path)))
    assert f"no folder {tmp_path / 'tiny-imagenet-200'}" in message and "tiny-imagenet-200.zip" in message


def test_missing_annotations_file_is_named(own_root):
    os.remove(os.path.join(own_root, "tiny-imagenet-200", "val", "val_annotations.txt"))
    assert "val_annotations.txt is missing" in _one_line_error(tiny_cfg(own_root))


def test_annotation_naming_an_absent_image_or_unknown_class_is_named(own_root):
    val = os.path.join(own_root, "tiny-imagenet-200", "val")
    os.remove(os.path.join(val, "images", "val_0.JPEG"))
    assert "1 image(s) listed in" in _one_line_error(tiny_cfg(own_root)) and "val_0.JPEG" in _one_line_error(
        tiny_cfg(own_root))
    with open(os.path.join(val, "val_annotations.txt"), "a") as f:
        f.write("val_9.JPEG\tn09999999\t0\t0\t1\t1\n")
    assert "line 5: class n09999999 has no folder" in _one_line_error(tiny_cfg(own_root))


def test_missing_train_or_val_folder_and_partial_archive(own_root):
    base = os.path.join(own_root, "tiny-imagenet-200")
    shutil.rmtree(os.path.join(base, "train", WNIDS[2]))
    message = _one_line_error(tiny_cfg(own_root))
    assert "wnids.txt lists 4 classes but" in message and f"1 only in wnids.txt ({WNIDS[2]})" in message
    shutil.rmtree(os.path.join(base, "val"))
    os.remove(os.path.join(base, "wnids.txt"))
    assert f"no folder {os.path.join(base, 'val')}" in _one_line_error(tiny_cfg(own_root))
    shutil.rmtree(os.path.join(base, "train"))
    assert f"no folder {os.path.join(base, 'train')}" in _one_line_error(tiny_cfg(own_root))


def test_val_with_both_layouts_or_no_images_is_refused(own_root):
    val = os.path.join(own_root, "tiny-imagenet-200", "val")
    os.makedirs(os.path.join(val, WNIDS[0]))
    assert "holds both class folders" in _one_line_error(tiny_cfg(own_root))
    shutil.rmtree(os.path.join(val, WNIDS[0]))
    shutil.rmtree(os.path.join(val, "images"))
    assert "no validation images in" in _one_line_error(tiny_cfg(own_root))


def test_an_image_that_is_not_64_pixels_is_named(own_root):
    path = os.path.join(own_root, "tiny-imagenet-200", "train", WNIDS[1], "images", f"{WNIDS[1]}_1.JPEG")
    Image.new("RGB", (32, 48)).save(path)
    train_set = get_dataset(tiny_cfg(own_root))[0].dataset
    index = [p for p, _ in train_set.samples].index(path)
    with pytest.raises(MdistillerError, match=r"unreadable image .*_1\.JPEG \(ValueError: 32x48 pixels, Tiny-ImageNet"):
        train_set[index]
    cfg = tiny_cfg(own_root)
    cfg.DATASET.SKIP_BAD_IMAGES = True
    loader = get_dataset(cfg)[0]
    assert sum(len(b["target"]) for b in loader) == 8 and loader.skipped_files == [path]


def test_gpu_decode_note_goes_through_the_logger_to_the_console_and_the_run_log(tiny_root, tmp_path, capsys):
    cfg = tiny_cfg(tiny_root)
    cfg.DATASET.GPU_DECODE = True
    with run_log(str(tmp_path)) as path:
        get_dataset(cfg)
    note = "DATASET.GPU_DECODE applies to ImageNet: Tiny-ImageNet's 64 px JPEGs are decoded with PIL in the workers"
    assert f"[mdistiller] {note}" in capsys.readouterr().out
    with open(path) as f:
        assert f"INFO {note}" in f.read()
