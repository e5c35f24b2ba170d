"""COCO-format detection data as detectron2 reads it: an instances JSON plus an image folder, categories mapped to
contiguous labels 0..K-1 in sorted category-id order, crowd boxes out of the training targets, images without a
non-crowd annotation dropped for training (DATALOADER.FILTER_EMPTY_ANNOTATIONS), and aspect-ratio-grouped batches.

Checked against detectron2 221448e4 (data/datasets/coco.py, detection_utils.py, dataset_mapper.py, build.py,
common.py, samplers/distributed_sampler.py): images sorted by id; `ignore` refused; an annotation whose polygons are
all invalid (odd length or < 3 points) dropped at load, before the crowd-only image filter (an empty `segmentation`
list is not filtered there; with masks the instance is dropped later, as filter_empty_instances does); EXIF
orientation applied before the RGB conversion; xywh -> xyxy in float32 (BoxMode.convert on the JSON list), then
scaled, flipped and clipped in float64 and cast to float32 once, a side <= 1e-5 dropped; the two aspect buckets
`w > h` / else on the JSON's sizes; TrainingSampler = one seeded torch generator, endless randperms, rank r taking
every world_size-th index from r, grouping per rank after that.
Remaining differences: detectron2 seeds the sampler from a random shared seed (SEED -1) and restarts it on resume
(here `seed` and `skip_batches`); it evaluates with 1 image per process (padding depends on the batch, see
detector.py); mask targets are rasterised here per image, upstream per box (model side)."""

from __future__ import annotations

import itertools
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from mdistiller.detection.transforms import (
    EvalResize,
    Geometry,
    TrainAugment,
    apply_geometry,
    clip_and_drop_empty,
    transform_polygon,
)
from mdistiller.errors import MdistillerError


@dataclass
class CocoRecord:
    """One image of the JSON: file, size, and its annotations (xyxy boxes, contiguous labels, crowd flags)."""

    image_id: int
    file_name: str
    height: int
    width: int
    boxes: np.ndarray  # (N, 4) float64 xyxy (float32 values, as detectron2's xywh -> xyxy), original pixels
    labels: np.ndarray  # (N,) int64 contiguous
    iscrowd: np.ndarray  # (N,) int64
    polygons: list = field(default_factory=list)  # per annotation: list of flat [x, y, ...] lists (or an RLE dict)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise MdistillerError(f"COCO annotation file not found: {path}")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MdistillerError(f"COCO annotation file {path} is not valid JSON: {str(err).splitlines()[0]}") from None
    return data


def category_ids(data: dict) -> list[int]:
    """The JSON's category ids, sorted: label k is the k-th of them (detectron2's thing_dataset_id_to_contiguous_id)."""
    return sorted(int(c["id"]) for c in data["categories"])


def load_coco_records(ann_file: str) -> tuple[list[CocoRecord], list[int]]:
    """Every image of an instances JSON (sorted by id) with its usable annotations, and the sorted category ids."""
    data = _read_json(ann_file)
    if not isinstance(data, dict):
        raise MdistillerError(f"COCO annotation file {ann_file} must hold an object, not {type(data).__name__}")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise MdistillerError(f"COCO annotation file {ann_file} has no {missing[0]!r} list")
    try:
        cats = category_ids(data)
        to_label = {c: i for i, c in enumerate(cats)}
        per_image: dict[int, list[dict]] = {}
        for ann in data["annotations"]:
            per_image.setdefault(int(ann["image_id"]), []).append(ann)
        records = []
        for img in sorted(data["images"], key=lambda im: int(im["id"])):
            boxes, labels, crowd, polys = [], [], [], []
            for ann in per_image.get(int(img["id"]), []):
                if ann.get("ignore", 0):
                    raise MdistillerError(f"COCO annotation {ann.get('id')} in {ann_file} has 'ignore' set "
                                          "(unsupported, as in detectron2)")
                segm = ann.get("segmentation")
                if isinstance(segm, list) and segm:
                    # detectron2 drops an instance whose polygons are all invalid (odd length or < 3 points); an
                    # empty list is not filtered (it is dropped later, and only when masks are used)
                    segm = [p for p in segm if len(p) % 2 == 0 and len(p) >= 6]
                    if not segm:
                        continue
                if int(ann["category_id"]) not in to_label:
                    raise MdistillerError(f"COCO annotation {ann.get('id')} in {ann_file} has category_id "
                                          f"{ann['category_id']}, not in 'categories'")
                # detectron2's BoxMode.convert of the JSON list makes a float32 tensor: xyxy rounded to float32
                x, y, w, h = np.asarray([float(v) for v in ann["bbox"]], dtype=np.float32)
                boxes.append([x, y, x + w, y + h])
                labels.append(to_label[int(ann["category_id"])])
                crowd.append(int(ann.get("iscrowd", 0)))
                polys.append(segm)
            records.append(CocoRecord(
                image_id=int(img["id"]), file_name=str(img["file_name"]), height=int(img["height"]),
                width=int(img["width"]), boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                labels=np.asarray(labels, dtype=np.int64), iscrowd=np.asarray(crowd, dtype=np.int64),
                polygons=polys))
    except (KeyError, TypeError, ValueError) as err:
        raise MdistillerError(f"COCO annotation file {ann_file} is malformed: {type(err).__name__} {err}") from None
    return records, cats


def has_non_crowd(record: CocoRecord) -> bool:
    """detectron2's filter_images_with_only_crowd_annotations: an image is kept when some annotation is not crowd."""
    return bool((record.iscrowd == 0).any())


def read_image(path: str) -> torch.Tensor:
    """An image file as uint8 RGB CHW, EXIF orientation applied (detectron2's read_image)."""
    if not os.path.isfile(path):
        raise MdistillerError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            rgb = ImageOps.exif_transpose(im).convert("RGB")
            array = np.asarray(rgb).copy()
    except OSError as err:
        raise MdistillerError(f"cannot read image {path}: {err}") from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _mask_api():
    try:
        from pycocotools import mask as mask_util
    except ImportError:
        raise MdistillerError('COCO masks need pycocotools: pip install -e ".[detection]"') from None
    return mask_util


def segmentation_to_mask(segm, height: int, width: int, geometry: Geometry) -> np.ndarray:
    """One annotation's polygons (moved, then rasterised as detectron2's polygons_to_bitmask) or RLE (decoded, then
    resized nearest and flipped) as a uint8 (new_h, new_w) mask of the transformed image."""
    mask_util = _mask_api()
    with warnings.catch_warnings():  # pycocotools' decode warns under numpy 2 (its __array__ signature)
        warnings.simplefilter("ignore", DeprecationWarning)
        return _segmentation_to_mask(mask_util, segm, height, width, geometry)


def _segmentation_to_mask(mask_util, segm, height: int, width: int, geometry: Geometry) -> np.ndarray:
    if isinstance(segm, list):
        if not segm:  # an instance without polygons (kept by detectron2's reader): an empty mask
            return np.zeros((geometry.new_h, geometry.new_w), dtype=np.uint8)
        polys = [transform_polygon(p, height, width, geometry) for p in segm]
        return mask_util.decode(mask_util.merge(mask_util.frPyObjects(polys, geometry.new_h, geometry.new_w)))
    if isinstance(segm, dict):
        rle = mask_util.frPyObjects(segm, height, width) if isinstance(segm.get("counts"), list) else segm
        mask = mask_util.decode(rle)
        if mask.shape != (geometry.new_h, geometry.new_w):
            mask = np.asarray(Image.fromarray(mask).resize((geometry.new_w, geometry.new_h), Image.NEAREST))
        return np.ascontiguousarray(mask[:, ::-1] if geometry.flip else mask)
    raise MdistillerError(f"unsupported segmentation of type {type(segm).__name__} (polygons or RLE expected)")


class CocoDetection(torch.utils.data.Dataset):
    """(image, target) pairs of a COCO-format folder; `train` selects detectron2's training behaviour.

    Training: images with no non-crowd annotation dropped (unless `filter_empty=False`), crowd annotations left out of
    the targets, TrainAugment (multi-scale resize + flip), boxes clipped and empty ones dropped. Evaluation: every
    image, EvalResize, all annotations kept with their `iscrowd` flag (COCO AP itself reads the JSON).
    target: boxes (N, 4) float32 xyxy in the resized image, labels (N,) int64 0..K-1, iscrowd (N,) int64, image_id,
    orig_size (h, w) of the file and size (h, w) after the transform; with `masks`, masks (N, h, w) uint8 too.
    `transform` is any object with `plan(height, width, generator) -> Geometry` (TrainAugment, EvalResize, KeepSize).
    """

    def __init__(self, image_dir: str, ann_file: str, *, train: bool, transform: Callable | None = None,
                 filter_empty: bool = True, masks: bool = False, generator: torch.Generator | None = None):
        if not os.path.isdir(image_dir):
            raise MdistillerError(f"COCO image folder not found: {image_dir}")
        records, self.category_ids = load_coco_records(ann_file)
        if train and filter_empty:
            records = [r for r in records if has_non_crowd(r)]
        if not records:
            raise MdistillerError(f"no usable images in {ann_file}")
        self.records = records
        self.image_dir = image_dir
        self.ann_file = ann_file
        self.train = train
        self.transform = transform if transform is not None else (TrainAugment() if train else EvalResize())
        self.generator = generator
        self.masks = masks
        if masks:
            _mask_api()

    def __len__(self) -> int:
        return len(self.records)

    def is_wide(self) -> list[bool]:
        """Per image, width > height: detectron2's aspect-ratio bucket 0 (the JSON's sizes, as upstream)."""
        return [r.width > r.height for r in self.records]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict]:
        """Item `key`, its augmentation drawn from `self.generator` (None: torch's RNG); or key = (index, seed), as
        GroupedBatchSampler yields: drawn from a generator seeded with `seed` (the same pixels in any worker)."""
        if isinstance(key, (tuple, list)):
            index, seed = key
            return self.load(int(index), torch.Generator().manual_seed(int(seed)))
        return self.load(int(key), self.generator)

    def load(self, index: int, generator: torch.Generator | None) -> tuple[torch.Tensor, dict]:
        """Image `index` and its target, the transform's random choices drawn from `generator`."""
        rec = self.records[index]
        image = read_image(os.path.join(self.image_dir, rec.file_name))
        if tuple(image.shape[1:]) != (rec.height, rec.width):
            raise MdistillerError(f"image {rec.file_name} is {image.shape[1]}x{image.shape[2]} but the JSON says "
                                  f"{rec.height}x{rec.width}")
        keep = rec.iscrowd == 0 if self.train else np.ones(len(rec.labels), dtype=bool)
        boxes = torch.from_numpy(rec.boxes[keep].copy())
        labels = torch.from_numpy(rec.labels[keep].copy())
        iscrowd = torch.from_numpy(rec.iscrowd[keep].copy())
        geometry = self.transform.plan(rec.height, rec.width, generator)
        image, boxes = apply_geometry(image, boxes, geometry)
        # detectron2 clips in float64, casts to float32 once, then drops boxes with a side <= 1e-5
        clip_and_drop_empty(boxes, image.shape[1], image.shape[2])
        boxes = boxes.float()
        nonempty = clip_and_drop_empty(boxes, image.shape[1], image.shape[2])
        if self.masks and self.train:
            # filter_empty_instances with masks: an instance without polygons (segmentation []) goes
            nonempty &= torch.tensor([not (isinstance(seg, list) and not seg)
                                      for seg, k in zip(rec.polygons, keep) if k], dtype=torch.bool)
        if not self.train:
            nonempty[:] = True
        target = {"boxes": boxes[nonempty], "labels": labels[nonempty], "iscrowd": iscrowd[nonempty],
                  "image_id": rec.image_id, "orig_size": (rec.height, rec.width),
                  "size": (image.shape[1], image.shape[2])}
        if self.masks:
            segms = [seg for seg, k in zip(rec.polygons, keep) if k]
            segms = [seg for seg, k in zip(segms, nonempty.tolist()) if k]
            if any(seg is None for seg in segms):
                raise MdistillerError(f"image {rec.file_name}: an annotation has no 'segmentation' (masks requested)")
            masks = [segmentation_to_mask(seg, rec.height, rec.width, geometry) for seg in segms]
            target["masks"] = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(
                0, geometry.new_h, geometry.new_w, dtype=torch.uint8)
        return image, target


def group_by_aspect(items: Iterable, is_wide: Sequence[bool], batch_size: int,
                    index_of: Callable[[Any], int] = int) -> Iterator[list]:
    """detectron2's AspectRatioGroupedDataset on a stream: two buckets (w > h, w <= h) by the image
    `is_wide[index_of(item)]`, a batch of items when one bucket is full. Plain indices come out as ints.

    A partial bucket is never emitted (upstream's stream is infinite, so it carries over)."""
    if batch_size < 1:
        raise MdistillerError(f"batch size must be at least 1, got {batch_size}")
    buckets: tuple[list, list] = ([], [])
    for item in items:
        index = index_of(item)
        bucket = buckets[0 if is_wide[index] else 1]
        bucket.append(index if index_of is int else item)
        if len(bucket) == batch_size:
            yield bucket[:]
            bucket.clear()


def infinite_shuffled(n: int, generator: torch.Generator) -> Iterator[int]:
    """detectron2's TrainingSampler: an endless stream of random permutations of range(n)."""
    while True:
        yield from torch.randperm(n, generator=generator).tolist()


SEED_HIGH = 2**62


def infinite_seeded_shuffled(n: int, generator: torch.Generator) -> Iterator[tuple[int, int]]:
    """`infinite_shuffled` with a seed for each position: per pass, randperm(n) then n seeds, both from `generator`."""
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        seeds = torch.randint(0, SEED_HIGH, (n,), generator=generator).tolist()
        yield from zip(order, seeds)


class GroupedBatchSampler(torch.utils.data.Sampler):
    """detectron2's training stream as an endless batch sampler of (index, seed) pairs (CocoDetection's keys).

    Each `iter()` draws one seed from `generator` (the DataLoader's own, saved by the trainer) and the whole stream
    comes from a private generator seeded with it: endless permutations of the images, each position with a seed for
    that item's augmentation (so the pixels do not depend on which worker, or how many, load it); rank r takes every
    world_size-th position from r of the shared stream; aspect-ratio grouping into per-process batches. So `generator`
    advances by one draw per iter() that yields a batch, however many are taken or prefetched. No __len__: it never
    ends."""

    def __init__(self, is_wide: Sequence[bool], batch_size: int, generator: torch.Generator, rank: int = 0,
                 world_size: int = 1):
        if not 0 <= rank < world_size:
            raise MdistillerError(f"rank {rank} outside 0..{world_size - 1}")
        if batch_size < 1:
            raise MdistillerError(f"batch size must be at least 1, got {batch_size}")
        self.is_wide, self.batch_size, self.generator = list(is_wide), batch_size, generator
        self.rank, self.world_size = rank, world_size
        self._skip = 0

    def skip_next(self, batches: int) -> None:
        """Make the next iterator that yields start `batches` batches into its stream (drawn but not loaded: a
        mid-period resume without reading the skipped images; call it on `loader.batch_sampler` before iter(loader))."""
        self._skip = int(batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        # a generator: the seed is drawn (and a skip taken) at the first batch, so an iterator made and never used
        # (a multi-worker DataLoader makes two at start and uses the second) draws and takes nothing
        skip, self._skip = self._skip, 0
        stream = torch.Generator().manual_seed(int(torch.randint(0, SEED_HIGH, (), generator=self.generator)))
        positions = itertools.islice(infinite_seeded_shuffled(len(self.is_wide), stream), self.rank, None,
                                     self.world_size)
        batches = group_by_aspect(positions, self.is_wide, self.batch_size, index_of=lambda item: item[0])
        yield from itertools.islice(batches, skip, None)


def collate(batch: list[tuple[torch.Tensor, dict]]) -> dict[str, list]:
    """{"images": list of uint8 CHW tensors, "targets": list of target dicts} (sizes differ; padding is the model's)."""
    return {"images": [b[0] for b in batch], "targets": [b[1] for b in batch]}
