"""Tiny-ImageNet (200 classes of 64x64 JPEGs) from `<DATASET.ROOT>/tiny-imagenet-200/`, mdistiller's folder.

Layout: the official tiny-imagenet-200.zip unpacked there, unchanged:
    train/<wnid>/images/<wnid>_<i>.JPEG       (500 per class; the <wnid>_boxes.txt beside them is not read)
    val/images/val_<i>.JPEG + val/val_annotations.txt   (10,000 images; the file gives each image's wnid)
    wnids.txt (checked against train/ when present); words.txt and test/ (unlabelled) are not read.
mdistiller reads val/ as an ImageFolder, so it needs the validation images sorted into val/<wnid>/ folders first;
that layout (val/<wnid>/[images/]*.JPEG) is read too. Either way a class's index is its rank among the sorted train
folder names (ImageFolder's rule: mdistiller's checkpoints give the same labels), and the validation images come in
the same order (by class, then file name).

Transforms (mdistiller's): train RandomRotation(20) + RandomHorizontalFlip + normalise; test normalise only; mean
(0.4802, 0.4481, 0.3975), std (0.2302, 0.2265, 0.2262). Nothing is resized: every image must be 64x64 (a file of
another size is reported like an unreadable one). The data set is never downloaded.

The splits are ImageNetFolder's (dict items, lazy decoding, DATASET.SKIP_BAD_IMAGES, ImageFolderLoader), so the
loaders, their resume state and torchrun sharding are exactly ImageNet's (dataset/__init__.py get_dataset).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Mapping

from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..errors import MdistillerError
from ..log import get_logger
from .imagenet import ImageNetFolder, class_difference, class_folders
from .registry import TINY_IMAGENET_VIEWS, DataRequest, register_dataset

TINY_IMAGENET_MEAN = (0.4802, 0.4481, 0.3975)
TINY_IMAGENET_STD = (0.2302, 0.2265, 0.2262)
TINY_IMAGENET_SIZE = 64
FOLDER = "tiny-imagenet-200"
log = get_logger(__name__)
LAYOUT = ("<DATASET.ROOT>/tiny-imagenet-200/{train/<wnid>/images/*.JPEG, val/images/*.JPEG + "
          "val/val_annotations.txt} (the official zip unpacked)")
VAL_LAYOUTS = "val/images/*.JPEG with val/val_annotations.txt (the official zip) or val/<wnid>/*.JPEG (sorted)"


# ---- layout ----

@dataclass(frozen=True)
class TinyImageNetLayout:
    """What check_layout found: the class names (sorted train folders) and, for the official validation layout,
    its (image path, class index) list (None: val/ is sorted into class folders)."""

    folder: str
    classes: list[str]
    val_samples: list[tuple[str, int]] | None


def tiny_folder(root: str) -> str:
    """`<root>/tiny-imagenet-200`."""
    return os.path.join(root, FOLDER)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _read_wnids(path: str) -> list[str]:
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def _official_val_samples(val: str, classes: list[str], image_names: set[str]) -> list[tuple[str, int]]:
    """(path, class index) of each image val_annotations.txt lists, ordered by class then file name."""
    annotations = os.path.join(val, "val_annotations.txt")
    if not os.path.isfile(annotations):
        raise MdistillerError(
            f"{os.path.join(val, 'images')} holds the validation images but {annotations} is missing: it gives their "
            f"classes. Unpack the official tiny-imagenet-200.zip again, or sort the images into val/<wnid>/ folders"
        )
    index = {wnid: i for i, wnid in enumerate(classes)}
    train = os.path.join(os.path.dirname(val), "train")
    samples, missing = [], []
    with open(annotations) as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2:
                raise MdistillerError(
                    f"{annotations} line {number}: expected '<file> <wnid> ...', got {line.strip()!r}"
                )
            name, wnid = fields[0], fields[1]
            if wnid not in index:
                raise MdistillerError(f"{annotations} line {number}: class {wnid} has no folder in {train}")
            if name not in image_names:
                missing.append(name)
            samples.append((os.path.join(val, "images", name), index[wnid]))
    if missing:
        raise MdistillerError(f"{len(missing)} image(s) listed in {annotations} are not in {val}{os.sep}images "
                              f"(first: {missing[0]}); unpack the official tiny-imagenet-200.zip again")
    if not samples:
        raise MdistillerError(f"{annotations} lists no image")
    return sorted(samples, key=lambda s: (s[1], os.path.basename(s[0])))


def check_layout(root: str) -> TinyImageNetLayout:
    """The classes and validation samples of a Tiny-ImageNet folder, after checking its layout (one-line errors)."""
    folder = tiny_folder(root)
    if not os.path.isdir(folder):
        raise MdistillerError(
            f"Tiny-ImageNet not found: no folder {folder}. Unpack the official tiny-imagenet-200.zip into DATASET.ROOT "
            f"(or set DATASET.ROOT / MDISTILLER_DATA to the folder holding {FOLDER}/; it is never downloaded)"
        )
    train = os.path.join(folder, "train")
    if not os.path.isdir(train):
        raise MdistillerError(f"no folder {train}. Expected layout {LAYOUT}")
    classes = class_folders(train)
    if not classes:
        raise MdistillerError(f"no class folders in {train}. Expected layout {LAYOUT}")
    wnids = os.path.join(folder, "wnids.txt")
    if os.path.isfile(wnids):
        listed = _read_wnids(wnids)
        if sorted(set(listed)) != classes:
            raise MdistillerError(
                f"{wnids} lists {len(set(listed))} classes but {train} holds {len(classes)} class folders: "
                f"{class_difference('wnids.txt', listed, 'train/', classes)} (a partly unpacked archive?)"
            )
    val = os.path.join(folder, "val")
    if not os.path.isdir(val):
        raise MdistillerError(f"no folder {val}. Expected {VAL_LAYOUTS}")
    sorted_classes = [name for name in class_folders(val) if name != "images"]
    images = os.path.join(val, "images")
    image_names = {n for n in os.listdir(images) if _is_image(n)} if os.path.isdir(images) else set()
    if sorted_classes and image_names:
        raise MdistillerError(
            f"{val} holds both class folders ({', '.join(sorted_classes[:3])}, ...) and images in images/: keep one "
            f"layout, {VAL_LAYOUTS}"
        )
    if sorted_classes:
        if sorted_classes != classes:
            raise MdistillerError(f"Tiny-ImageNet train and val class folders differ under {folder}: "
                                  + class_difference("train", classes, "val", sorted_classes))
        return TinyImageNetLayout(folder, classes, None)
    if not image_names:
        raise MdistillerError(f"no validation images in {val}. Expected {VAL_LAYOUTS}")
    return TinyImageNetLayout(folder, classes, _official_val_samples(val, classes, image_names))


def tiny_imagenet_num_classes(cfg) -> int:
    """The number of train class folders (200 in the full set)."""
    return len(check_layout(cfg.DATASET.ROOT).classes)


def check_options(cfg) -> None:
    """Refuse the ImageNet-only DATASET.IMAGE_SIZE at a size this data set would not train at."""
    if cfg.DATASET.IMAGE_SIZE not in (TINY_IMAGENET_SIZE, 224):
        raise MdistillerError(
            f"DATASET.IMAGE_SIZE {cfg.DATASET.IMAGE_SIZE} does not apply to tiny_imagenet: its images are 64x64 and "
            f"are not resized (mdistiller's transforms); leave it at its default (224, for ImageNet) or set 64"
        )


# ---- transforms ----

@TINY_IMAGENET_VIEWS.register("standard")
def tiny_imagenet_train_transform(mean: tuple, std: tuple) -> Callable:
    """RandomRotation(20) (uniform in [-20, 20] degrees, nearest, black corners) + horizontal flip + normalise."""
    return transforms.Compose([
        transforms.RandomRotation(20),
        transforms.RandomHorizontalFlip(0.5),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


@TINY_IMAGENET_VIEWS.register("test")
def tiny_imagenet_test_transform(mean: tuple, std: tuple) -> Callable:
    """Normalise only (the images are already 64x64)."""
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])


def build_tiny_imagenet_views(view_names: Mapping[str, str]) -> dict[str, Callable]:
    """Batch key -> Tiny-ImageNet transform for the view names a distiller declares."""
    return {key: TINY_IMAGENET_VIEWS.get(name)(TINY_IMAGENET_MEAN, TINY_IMAGENET_STD)
            for key, name in view_names.items()}


# ---- data sets ----

class TinyImageNetFolder(ImageNetFolder):
    """One split: ImageNetFolder's items and bad-image handling, with the class list fixed to the train folders' and,
    for the official validation layout, the (path, class index) samples read from val_annotations.txt."""

    dataset_name = "Tiny-ImageNet"

    def __init__(self, folder: str, views: Mapping[str, Callable], classes: list[str],
                 samples: list[tuple[str, int]] | None = None, skip_bad_images: bool = False):
        self._classes = list(classes)
        self._listed = samples
        super().__init__(folder, views, skip_bad_images)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._classes, {name: i for i, name in enumerate(self._classes)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        """The listed samples, or ImageFolder's walk of the class folders (images in any sub-folder)."""
        if self._listed is not None:
            return list(self._listed)
        return super().make_dataset(directory, class_to_idx, extensions, is_valid_file, allow_empty)

    def read(self, path: str):
        """The RGB image of one file; raises on an unreadable one or one that is not 64x64."""
        image = super().read(path)
        if image.size != (TINY_IMAGENET_SIZE, TINY_IMAGENET_SIZE):
            raise ValueError(f"{image.size[0]}x{image.size[1]} pixels, Tiny-ImageNet images are 64x64")
        return image


def build_tiny_imagenet_test_set(cfg) -> TinyImageNetFolder:
    """The val split with the test transform."""
    check_options(cfg)
    layout = check_layout(cfg.DATASET.ROOT)
    views = {"image": tiny_imagenet_test_transform(TINY_IMAGENET_MEAN, TINY_IMAGENET_STD)}
    return TinyImageNetFolder(os.path.join(layout.folder, "val"), views, layout.classes, layout.val_samples,
                              cfg.DATASET.SKIP_BAD_IMAGES)


@register_dataset("tiny_imagenet", num_classes=tiny_imagenet_num_classes, test_set=build_tiny_imagenet_test_set)
def build_tiny_imagenet_datasets(cfg, request: DataRequest) -> tuple[TinyImageNetFolder, TinyImageNetFolder, int]:
    """Train set (the requested views), val set (test transform) and the class count (request.device: unused)."""
    check_options(cfg)
    if cfg.DATASET.GPU_DECODE:
        log.info("DATASET.GPU_DECODE applies to ImageNet: Tiny-ImageNet's 64 px JPEGs are decoded with PIL in the "
                 "workers")
    layout = check_layout(cfg.DATASET.ROOT)
    views = build_tiny_imagenet_views(request.train_views)
    train_set = TinyImageNetFolder(os.path.join(layout.folder, "train"), views, layout.classes, None,
                                   cfg.DATASET.SKIP_BAD_IMAGES)
    return train_set, build_tiny_imagenet_test_set(cfg), len(layout.classes)
