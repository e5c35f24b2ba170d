"""DATASET.TYPE "coco": detectron2's datasets/coco folder as the detection task's data (docs/detection.md).

DATASET.ROOT holds annotations/instances_<split>.json and the image folder <split>/ for DETECTION.TRAIN_SPLIT and
DETECTION.TEST_SPLIT. Batches are {"images": list of uint8 RGB (3, H, W) tensors, resized (and flipped) by the pipeline,
"targets": list of CocoDetection target dicts}. The training loader is endless (detectron2's TrainingSampler + aspect
grouping, GroupedBatchSampler): its stream is a function of its `generator`'s state alone when `iter()` is called, so
the trainer's saved generator state replays it exactly.
"""

from __future__ import annotations

import functools
import os
from typing import Mapping

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from mdistiller import distributed
from mdistiller.dataset import seed_rank_worker, seed_worker
from mdistiller.dataset.registry import DataRequest, register_dataset
from mdistiller.detection.coco import CocoDetection, GroupedBatchSampler, collate
from mdistiller.detection.detector import NUM_CLASSES
from mdistiller.detection.transforms import EvalResize, TrainAugment
from mdistiller.errors import MdistillerError

LAYOUT = ("detectron2's datasets/coco layout: <DATASET.ROOT>/annotations/instances_<split>.json and "
          "<DATASET.ROOT>/<split>/ for DETECTION.TRAIN_SPLIT and DETECTION.TEST_SPLIT (see docs/detection.md)")


def split_paths(cfg, split: str) -> tuple[str, str]:
    """(image folder, instances JSON) of one split under DATASET.ROOT."""
    root = cfg.DATASET.ROOT
    return os.path.join(root, split), os.path.join(root, "annotations", f"instances_{split}.json")


def check_coco_data(cfg) -> None:
    """The two splits' JSONs and image folders exist (nothing is read), and DETECTION.MASK_ON is off."""
    if cfg.DETECTION.MASK_ON:
        raise MdistillerError("DETECTION.MASK_ON True: Mask R-CNN students are not built; set it False "
                              "(box AP only, see docs/detection.md)")
    for split in (cfg.DETECTION.TRAIN_SPLIT, cfg.DETECTION.TEST_SPLIT):
        check_coco_split(cfg, split)


def check_coco_split(cfg, split: str) -> None:
    """One split's JSON and image folder exist under DATASET.ROOT (nothing is read)."""
    image_dir, ann_file = split_paths(cfg, split)
    if not os.path.isfile(ann_file):
        raise MdistillerError(f"COCO annotation file not found: {ann_file}; expected {LAYOUT}")
    if not os.path.isdir(image_dir):
        raise MdistillerError(f"COCO image folder not found: {image_dir}; expected {LAYOUT}")


def coco_num_classes(cfg) -> int:
    """80: the detectors' fixed foreground class count (a JSON with another count is refused when it is read)."""
    return NUM_CLASSES


def _check_categories(dataset: CocoDetection, reference: list[int] | None = None) -> None:
    if len(dataset.category_ids) != NUM_CLASSES:
        raise MdistillerError(f"{dataset.ann_file} has {len(dataset.category_ids)} categories; the detectors have "
                              f"{NUM_CLASSES} foreground classes (COCO's)")
    if reference is not None and dataset.category_ids != reference:
        raise MdistillerError(f"{dataset.ann_file} has other category ids than the training split's")


def build_coco_test_set(cfg) -> CocoDetection:
    """The test split: every image, EvalResize(MIN_SIZE_TEST, MAX_SIZE_TEST), all annotations with their crowd flag."""
    check_coco_split(cfg, cfg.DETECTION.TEST_SPLIT)
    image_dir, ann_file = split_paths(cfg, cfg.DETECTION.TEST_SPLIT)
    test_set = CocoDetection(image_dir, ann_file, train=False,
                             transform=EvalResize(int(cfg.DETECTION.MIN_SIZE_TEST), int(cfg.DETECTION.MAX_SIZE_TEST)))
    _check_categories(test_set)
    return test_set


def per_process_batch(cfg, world_size: int) -> int:
    """SOLVER.BATCH_SIZE (images per step, all processes) / world_size, refused when it does not divide."""
    total = int(cfg.SOLVER.BATCH_SIZE)
    if total < world_size or total % world_size:
        raise MdistillerError(f"SOLVER.BATCH_SIZE {total} (images per step over all processes) must be a multiple of "
                              f"the {world_size} processes")
    return total // world_size


def train_loader(train_set: CocoDetection, batch_size: int, workers: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> DataLoader:
    """The endless, aspect-grouped training loader of `batch_size` images per process; its `generator` (seeded with
    `seed`) is the only source of the stream (order and augmentation)."""
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    sampler = GroupedBatchSampler(train_set.is_wide(), batch_size, generator, rank, world_size)
    init = seed_worker if world_size == 1 else functools.partial(seed_rank_worker, rank)
    # no persistent workers: a fresh iterator draws its base seed from `generator` at every iter(), a resumed
    # persistent one does not, so the stream would depend on whether iter() was called before
    return DataLoader(train_set, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=torch.cuda.is_available(), generator=generator, worker_init_fn=init,
                      persistent_workers=False)


def eval_loader(test_set: Dataset, batch_size: int, workers: int, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Sequential over the test set (rank's contiguous share under torchrun), dict batches."""
    if world_size > 1:
        start, end = distributed.shard_bounds(len(test_set), rank, world_size)
        test_set = Subset(test_set, range(start, end))
    return DataLoader(test_set, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
                      pin_memory=torch.cuda.is_available(), worker_init_fn=seed_worker)


def coco_loaders(cfg, train_set: CocoDetection, test_set: CocoDetection, request: DataRequest,
                 needs: Mapping[str, object], seed: int, rank: int, world_size: int) -> tuple[DataLoader, DataLoader]:
    """(endless training loader, evaluation loader) for get_dataset."""
    if needs:
        raise MdistillerError(f"the COCO data path cannot serve {', '.join(sorted(needs))} (a classification need)")
    workers = int(cfg.DATASET.NUM_WORKERS)
    train = train_loader(train_set, per_process_batch(cfg, world_size), workers, seed, rank, world_size)
    test = eval_loader(test_set, int(cfg.DATASET.TEST.BATCH_SIZE), workers, rank, world_size)
    return train, test


@register_dataset("coco", num_classes=coco_num_classes, test_set=build_coco_test_set, check=check_coco_data,
                  task="detection", loaders=coco_loaders)
def build_coco_datasets(cfg, request: DataRequest) -> tuple[CocoDetection, CocoDetection, int]:
    """Train split (images without a non-crowd annotation dropped, TrainAugment(MIN_SIZE_TRAIN, MAX_SIZE_TRAIN)),
    test split (EvalResize) and 80."""
    if dict(request.train_views) != {"image": "standard"}:
        raise MdistillerError(f"the COCO data path has no training views {dict(request.train_views)} (detection "
                              "trains on its one pipeline)")
    test_set = build_coco_test_set(cfg)
    image_dir, ann_file = split_paths(cfg, cfg.DETECTION.TRAIN_SPLIT)
    sizes = cfg.DETECTION.MIN_SIZE_TRAIN
    short_edges = (int(sizes),) if isinstance(sizes, (int, float)) else tuple(int(s) for s in sizes)
    if not short_edges:
        raise MdistillerError("DETECTION.MIN_SIZE_TRAIN is empty; give the training short edges, e.g. (640, ..., 800)")
    augment = TrainAugment(short_edges=short_edges, max_size=int(cfg.DETECTION.MAX_SIZE_TRAIN))
    train_set = CocoDetection(image_dir, ann_file, train=True, transform=augment)
    _check_categories(train_set)
    _check_categories(test_set, train_set.category_ids)
    return train_set, test_set, NUM_CLASSES
