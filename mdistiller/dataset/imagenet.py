"""ImageNet from mdistiller's ImageFolder layout: `<DATASET.ROOT>/imagenet/{train,val}/<wnid>/*.JPEG`.

Train: RandomResizedCrop(S) + horizontal flip + normalise; test: Resize(S * 256 / 224) + CenterCrop(S) + normalise, with
S = DATASET.IMAGE_SIZE (224: the recipe of every ImageNet table). The class count is the number of class folders
(train and val must hold the same ones). The views a distiller names ("standard", "strong", "test") have ImageNet
versions here; "strong" is MLKD's ImageNet view as the logit-standardisation repo builds it (see RangeRandAugment).

Images are decoded lazily, so an unreadable file shows up when a batch first needs it: by default that stops the run
with the file's name; with DATASET.SKIP_BAD_IMAGES True the next readable image of the split takes its place, and the
loader (ImageFolderLoader) counts such files and reports them once per pass.

With DATASET.GPU_DECODE on a CUDA run whose distiller needs the standard view alone, the training workers do not
decode: the batch's JPEG files are decoded on the GPU in one call and cropped, resized, flipped and normalised there
(jpeg_decode.py, ImageNetJpegFolder, JpegDecodeLoader). Validation keeps the PIL path.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Iterator, Mapping

import torch
from PIL import Image, ImageEnhance, ImageOps
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import ImageFolder

from ..errors import MdistillerError
from ..log import get_logger
from .augment import CUTOUT_FILL, cutout
from .contrastive import ContrastiveSampler
from .jpeg_decode import collate_encoded, decode_batch, draw_crop, read_encoded
from .registry import IMAGENET_VIEWS, DataRequest, register_dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
log = get_logger(__name__)
LAYOUT = "<DATASET.ROOT>/imagenet/{train,val}/<wnid>/*.JPEG"
# Per-item bookkeeping of skipped files; ImageFolderLoader takes these keys out of every batch.
SKIPPED_COUNT = "_skipped_images"
SKIPPED_FILES = "_skipped_files"


# ---- layout ----

def split_folder(root: str, split: str) -> str:
    """`<root>/imagenet/<split>`."""
    return os.path.join(root, "imagenet", split)


def class_folders(folder: str) -> list[str]:
    """Sorted names of the sub-folders of `folder` (hidden ones excluded): the classes."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def class_difference(first: str, first_classes: list[str], second: str, second_classes: list[str]) -> str:
    """'N only in <first> (a, b, ...); M only in <second> (...)' for two class lists that differ."""
    only_first = sorted(set(first_classes) - set(second_classes))
    only_second = sorted(set(second_classes) - set(first_classes))
    parts = [f"{len(only_first)} only in {first} ({_few(only_first)})" if only_first else "",
             f"{len(only_second)} only in {second} ({_few(only_second)})" if only_second else ""]
    return "; ".join(p for p in parts if p)


def check_layout(root: str) -> list[str]:
    """The class names of an ImageNet folder, after checking that train and val exist and hold the same classes."""
    classes = {}
    for split in ("train", "val"):
        folder = split_folder(root, split)
        if not os.path.isdir(folder):
            raise MdistillerError(
                f"ImageNet not found: no folder {folder}. Expected layout {LAYOUT}; set DATASET.ROOT (or the "
                f"MDISTILLER_DATA environment variable) to the folder that holds imagenet/"
            )
        classes[split] = class_folders(folder)
        if not classes[split]:
            loose = any(name.lower().endswith((".jpeg", ".jpg", ".png")) for name in os.listdir(folder))
            hint = " (the images lie directly in it: sort them into one folder per class)" if loose else ""
            raise MdistillerError(f"no class folders in {folder}{hint}. Expected layout {LAYOUT}")
    if classes["train"] != classes["val"]:
        raise MdistillerError(
            f"ImageNet train and val class folders differ under {os.path.join(root, 'imagenet')}: "
            + class_difference("train", classes["train"], "val", classes["val"])
        )
    return classes["train"]


def imagenet_num_classes(cfg) -> int:
    """The number of class folders (checked by check_layout)."""
    return len(check_layout(cfg.DATASET.ROOT))


# ---- transforms ----

def image_size_of(cfg) -> int:
    """DATASET.IMAGE_SIZE, checked."""
    size = cfg.DATASET.IMAGE_SIZE
    if size <= 0:
        raise MdistillerError(f"DATASET.IMAGE_SIZE must be positive, got {size}")
    return size


@IMAGENET_VIEWS.register("standard")
def imagenet_train_transform(mean: tuple, std: tuple, image_size: int = 224) -> Callable:
    """RandomResizedCrop(S) + horizontal flip + normalise."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


@IMAGENET_VIEWS.register("test")
def imagenet_test_transform(mean: tuple, std: tuple, image_size: int = 224) -> Callable:
    """Resize(S * 256 / 224) + CenterCrop(S) + normalise (Resize(256) + CenterCrop(224) at S = 224)."""
    return transforms.Compose([
        transforms.Resize(round(image_size * 256 / 224)),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _affine(img: Image.Image, coeffs: tuple) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, coeffs)


# (op, low, high): the op gets a value drawn uniformly from [low, high] (MLKD's ImageNet pool, in its order).
RANGE_OPS: tuple[tuple[Callable[[Image.Image, float], Image.Image], float, float], ...] = (
    (lambda img, v: ImageOps.autocontrast(img), 0, 1),
    (lambda img, v: ImageEnhance.Brightness(img).enhance(v), 0.05, 0.95),
    (lambda img, v: ImageEnhance.Color(img).enhance(v), 0.05, 0.95),
    (lambda img, v: ImageEnhance.Contrast(img).enhance(v), 0.05, 0.95),
    (lambda img, v: ImageOps.equalize(img), 0, 1),
    (lambda img, v: img, 0, 1),
    (lambda img, v: ImageOps.posterize(img, max(1, int(v))), 4, 8),
    (lambda img, v: img.rotate(v), -30, 30),
    (lambda img, v: ImageEnhance.Sharpness(img).enhance(v), 0.05, 0.95),
    (lambda img, v: _affine(img, (1, v, 0, 0, 1, 0)), -0.3, 0.3),
    (lambda img, v: _affine(img, (1, 0, 0, v, 1, 0)), -0.3, 0.3),
    (lambda img, v: ImageOps.solarize(img, int(v)), 0, 256),
    (lambda img, v: _affine(img, (1, 0, v * img.size[0], 0, 1, 0)), -0.3, 0.3),
    (lambda img, v: _affine(img, (1, 0, 0, 0, 1, v * img.size[1])), -0.3, 0.3),
)


class RangeRandAugment:
    """MLKD's ImageNet RandAugment: `n` ops drawn with replacement, each always applied at a value uniform in its
    range, then a grey Cutout square of side U(0, 1/2) x the image width. (The CIFAR view uses FixMatch's
    RandAugmentMC instead: p = 1/2 per op, levels 1..m-1, half-side Cutout.) Draws come from torch's RNG."""

    def __init__(self, n: int = 2, max_cutout_fraction: float = 0.5, fill: tuple = CUTOUT_FILL):
        self.n = n
        self.max_cutout_fraction = max_cutout_fraction
        self.fill = tuple(fill)

    def __call__(self, img: Image.Image) -> Image.Image:
        for index in torch.randint(len(RANGE_OPS), (self.n,)).tolist():
            op, low, high = RANGE_OPS[index]
            img = op(img, _uniform(low, high))
        side = int(_uniform(0.0, self.max_cutout_fraction) * img.size[0])
        return cutout(img, side, self.fill) if side > 0 else img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, max_cutout_fraction={self.max_cutout_fraction})"


@IMAGENET_VIEWS.register("strong")
def imagenet_strong_transform(mean: tuple, std: tuple, image_size: int = 224) -> Callable:
    """RandomResizedCrop(S) + flip + RangeRandAugment(2) + Cutout + normalise: MLKD's ImageNet strong view."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
        RangeRandAugment(n=2),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def build_imagenet_views(view_names: Mapping[str, str], image_size: int) -> dict[str, Callable]:
    """Batch key -> ImageNet transform for the view names a distiller declares."""
    return {key: IMAGENET_VIEWS.get(name)(IMAGENET_MEAN, IMAGENET_STD, image_size) for key, name in view_names.items()}


# ---- data set and loader ----

def _load_rgb(path: str) -> Image.Image:
    with open(path, "rb") as f:
        image = Image.open(f)
        return image.convert("RGB")  # decodes the whole file: a truncated or corrupt one fails here


def _last_line(exc: BaseException) -> str:
    """A worker's exception arrives as 'Caught X in DataLoader worker ... Traceback ...': keep its message."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    last = lines[-1] if lines else str(exc)
    prefix = f"{MdistillerError.__module__}.{MdistillerError.__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


class ImageFolderLoader(DataLoader):
    """A DataLoader that takes the skipped-image bookkeeping out of each batch, counts it (`skipped_images`,
    `skipped_files`) and reports it once per pass; a worker's MdistillerError comes back as its one-line message."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped_images = 0  # over all passes
        self.skipped_files: list[str] = []  # distinct names, first seen first

    def __iter__(self) -> Iterator[dict]:
        iterator = super().__iter__()
        skipped = 0
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                break
            except MdistillerError as exc:
                raise MdistillerError(_last_line(exc)) from None
            count = batch.pop(SKIPPED_COUNT, None)
            names = batch.pop(SKIPPED_FILES, None)
            if count is not None and int(count.sum()):
                skipped += int(count.sum())
                for joined in names:
                    for name in filter(None, joined.split("\n")):
                        if name not in self.skipped_files:
                            self.skipped_files.append(name)
            yield batch
        if skipped:
            self.skipped_images += skipped
            split = os.path.basename(os.path.normpath(getattr(self.dataset, "root", ""))) or "data"
            log.warning(
                f"DATASET.SKIP_BAD_IMAGES: skipped {skipped} unreadable image(s) in this pass over "
                f"{split} ({len(self.skipped_files)} distinct file(s) so far, e.g. {self.skipped_files[0]})"
            )


class ImageNetFolder(ImageFolder):
    """torchvision's ImageFolder whose items are dicts `{view key: tensor, "target", "index"}` (mdistiller's batch
    format), reading images lazily; an unreadable image raises, or with skip_bad_images is replaced by the next
    readable one of the split and counted."""

    loader_class = ImageFolderLoader
    dataset_name = "ImageNet"  # in error messages (Tiny-ImageNet's folders subclass this one)
    contrastive: ContrastiveSampler | None = None  # CRD's "contrastive_index" need, when served
    contrastive_replacement = "always"  # upstream's ImageNet / Tiny-ImageNet CRD sets draw negatives with replacement

    def __init__(self, folder: str, views: Mapping[str, Callable], skip_bad_images: bool = False):
        try:
            super().__init__(folder, loader=_load_rgb)
        except FileNotFoundError as exc:  # a class folder without any image file
            raise MdistillerError(f"{self.dataset_name} folder {folder}: {exc}") from None
        self.views = dict(views)
        self.skip_bad_images = bool(skip_bad_images)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = class_folders(directory)  # same rule as check_layout (hidden folders are not classes)
        if not classes:
            raise MdistillerError(f"no class folders in {directory}. Expected layout {LAYOUT}")
        return classes, {name: i for i, name in enumerate(classes)}

    def __getitem__(self, index: int) -> dict:
        skipped: list[str] = []
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            path, target = self.samples[i]
            try:
                image = self.read(path)
            except Exception as exc:  # PIL raises OSError, ValueError, DecompressionBombError, SyntaxError, ...
                if not self.skip_bad_images:
                    raise MdistillerError(unreadable_message(path, exc)) from None
                skipped.append(path)
                continue
            item = {}
            if self.contrastive is not None:  # for the sample served (i), before the views' draws
                item["contrastive_index"] = self.contrastive.draw_one(i, target)
            item.update(self.make_item(image, path))
            item.update({"target": target, "index": i, SKIPPED_COUNT: len(skipped), SKIPPED_FILES: "\n".join(skipped)})
            return item
        raise MdistillerError(f"no readable image in {self.root} (all {len(self.samples)} files failed to decode)")

    def class_labels(self) -> torch.Tensor:
        """The class of every sample, in index order."""
        return torch.as_tensor(self.targets, dtype=torch.long)

    def read(self, path: str):
        """The image of one file; raises on an unreadable one."""
        return self.loader(path)

    def make_item(self, image, path: str) -> dict:
        """The item's images: one transformed view per batch key."""
        return {key: transform(image) for key, transform in self.views.items()}


def unreadable_message(path: str, exc: BaseException) -> str:
    """The one-line error of an unreadable image."""
    detail = re.sub(r"^\w+, \S+:\d+, ", "", " ".join(str(exc).split()))  # torchvision's "fn, file.cpp:171, " prefix
    return (f"unreadable image {path} ({type(exc).__name__}: {detail[:100]}); replace or remove it, or set "
            f"DATASET.SKIP_BAD_IMAGES True to skip such files")


# ---- DATASET.GPU_DECODE (see jpeg_decode.py) ----
# Runs the GPU_DECODE path on a CPU device (tests, the CPU bench): the same code, decode_jpeg on the CPU.
DECODE_ON_CPU_ENV = "MDISTILLER_GPU_DECODE_ON_CPU"


class JpegDecodeLoader(ImageFolderLoader):
    """ImageFolderLoader over an ImageNetJpegFolder: workers yield encoded files with their crop boxes and flips,
    and each batch is decoded and transformed on the folder's device into {"image", "target", "index"}."""

    def __init__(self, dataset: ImageNetJpegFolder, *args, **kwargs):
        kwargs.setdefault("collate_fn", collate_encoded)
        super().__init__(dataset, *args, **kwargs)

    def __iter__(self) -> Iterator[dict]:
        folder = self.dataset
        for batch in super().__iter__():
            out = decode_batch(batch, folder.device, folder.image_size, IMAGENET_MEAN, IMAGENET_STD, self._on_bad)
            if out is not None:
                yield out

    def _on_bad(self, path: str, exc: Exception) -> None:
        if not self.dataset.skip_bad_images:
            raise MdistillerError(unreadable_message(path, exc))
        self.skipped_images += 1
        if path not in self.skipped_files:
            self.skipped_files.append(path)
        log.warning(f"DATASET.SKIP_BAD_IMAGES: dropped unreadable image {path} from its batch "
                    f"(no decoder read it: {type(exc).__name__})")


class ImageNetJpegFolder(ImageNetFolder):
    """The training split for DATASET.GPU_DECODE: items hold the encoded file (or, for a file the device decoder
    does not take, PIL's decoded image), its RandomResizedCrop box and flip; JpegDecodeLoader decodes on `device`."""

    loader_class = JpegDecodeLoader

    def __init__(self, folder: str, image_size: int, device: torch.device | str, skip_bad_images: bool = False):
        super().__init__(folder, {}, skip_bad_images)
        self.image_size = image_size
        self.device = torch.device(device)

    def read(self, path: str):
        """(encoded bytes or PIL-decoded tensor, header image); raises on a file PIL cannot open."""
        return read_encoded(path)

    def make_item(self, image, path: str) -> dict:
        """The encoded image with its crop box and flip coin (drawn as the PIL path's transforms draw them)."""
        data, header = image
        box, flip = draw_crop(header)
        return {"data": data, "box": box, "flip": flip, "path": path}


def gpu_decode_blocker(cfg, train_views: Mapping[str, str], device) -> str | None:
    """Why DATASET.GPU_DECODE cannot apply to this run (None when it applies)."""
    if dict(train_views) != {"image": "standard"}:
        return f"the distiller's views {dict(train_views)} are not the standard view alone"
    on_cpu_allowed = os.environ.get(DECODE_ON_CPU_ENV, "") not in ("", "0")
    if device is None or (torch.device(device).type != "cuda" and not on_cpu_allowed):
        return f"the device is {device or 'not given'}, not CUDA"
    return None


def build_imagenet_test_set(cfg) -> ImageNetFolder:
    """The val split with the test transform."""
    check_layout(cfg.DATASET.ROOT)
    size = image_size_of(cfg)
    return ImageNetFolder(split_folder(cfg.DATASET.ROOT, "val"),
                          {"image": imagenet_test_transform(IMAGENET_MEAN, IMAGENET_STD, size)},
                          cfg.DATASET.SKIP_BAD_IMAGES)


@register_dataset("imagenet", num_classes=imagenet_num_classes, test_set=build_imagenet_test_set)
def build_imagenet_datasets(cfg, request: DataRequest) -> tuple[ImageNetFolder, ImageNetFolder, int]:
    """Train set (the requested views; decoded on request.device with DATASET.GPU_DECODE), val set (test transform)
    and the class count."""
    classes = check_layout(cfg.DATASET.ROOT)
    views = build_imagenet_views(request.train_views, image_size_of(cfg))
    folder = split_folder(cfg.DATASET.ROOT, "train")
    device = request.device
    blocker = gpu_decode_blocker(cfg, request.train_views, device) if cfg.DATASET.GPU_DECODE else None
    if blocker:
        log.info(f"DATASET.GPU_DECODE: decoding with PIL in the workers instead: {blocker}")
    if cfg.DATASET.GPU_DECODE and not blocker:
        train_set = ImageNetJpegFolder(folder, image_size_of(cfg), device, cfg.DATASET.SKIP_BAD_IMAGES)
        log.info(f"DATASET.GPU_DECODE: training JPEGs decoded on {train_set.device}, batched")
    else:
        train_set = ImageNetFolder(folder, views, cfg.DATASET.SKIP_BAD_IMAGES)
    return train_set, build_imagenet_test_set(cfg), len(classes)
