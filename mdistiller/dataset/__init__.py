"""Data sets and loaders. A distiller names the training views it needs; this package builds them.

Each data set, view and batch need registers itself where it is defined (registry.py): `DATASETS` maps DATASET.TYPE
to its builder `(cfg, DataRequest) -> (train set, test set, class count)` and what else the type provides;
`TRAIN_VIEWS`, `IMAGENET_VIEWS` and `TINY_IMAGENET_VIEWS` hold each family's version of a view by name. A distiller
declares `train_views={"image": "standard"}` in its Declaration (the default) or e.g. `{"image_weak":
"standard", "image_strong": "strong"}`, each data set builds its own version of the named views, and every
training batch is a dict holding one tensor per batch key plus "target" and "index".

A distiller may also need more in each training batch (its `Declaration.batch_needs`, names registered in BATCH_NEEDS):
CRD's "contrastive_index" (contrastive.py) is served by ImageArrayDataset and the ImageNet / Tiny-ImageNet folders per
item, and by the device-resident CIFAR loader per global batch; the teacher cache's "view_id" (teacher_views.py) by
the CIFAR sets on both paths.

Every module of this package is imported below (import_submodules), so a new data set, view or need is a new module
that registers itself: no list to edit here.
"""

from __future__ import annotations

import functools
import random
from typing import Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, Subset

from .. import distributed
from ..errors import MdistillerError
from .cifar_sets import ImageArrayDataset, standard_train_transform, test_transform
from .contrastive import contrastive_sampler
from .registry import (
    BATCH_NEEDS,
    DATASETS,
    IMAGENET_VIEWS,
    TINY_IMAGENET_VIEWS,
    TRAIN_VIEWS,
    DataRequest,
    DatasetType,
    Registry,
    import_submodules,
    register_dataset,
)
from .teacher_views import view_refusal

import_submodules(__name__, __path__)

__all__ = [
    "BATCH_NEEDS", "DATASETS", "IMAGENET_VIEWS", "TINY_IMAGENET_VIEWS", "TRAIN_VIEWS", "DataRequest", "DatasetType",
    "ImageArrayDataset", "Registry", "ShardedBatchSampler", "check_batch_needs", "check_data", "contrastive_sampler",
    "eval_loader", "get_dataset", "get_test_set", "num_classes_of", "register_dataset", "serve_batch_needs",
    "shutdown_workers", "standard_train_transform", "test_transform", "uses_device_resident_data", "with_augment",
]


def num_classes_of(cfg) -> int:
    """The class count of DATASET.TYPE, checked against DATASET.NUM_CLASSES when that is set."""
    count = DATASETS.get(cfg.DATASET.TYPE).num_classes(cfg)
    if cfg.DATASET.NUM_CLASSES not in (0, count):
        raise MdistillerError(
            f"DATASET.NUM_CLASSES is {cfg.DATASET.NUM_CLASSES} but {cfg.DATASET.TYPE} has {count} classes"
        )
    return count


def seed_worker(worker_id: int) -> None:
    """A loader worker's numpy and Python RNGs seeded from its torch seed (DataLoader's worker_init_fn)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def seed_rank_worker(rank: int, worker_id: int) -> None:
    """Under torchrun every rank's workers get the same seeds from the shared generator: mix the rank in."""
    seed = distributed.rank_seed(torch.initial_seed(), rank)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class ShardedBatchSampler(Sampler[list[int]]):
    """Rank's share of the global batches a one-process shuffled DataLoader draws from the same generator.

    The permutation comes from a RandomSampler on `generator` (the loader's seeded generator, identical on every rank
    and saved by the trainer for resume), cut into global batches of `batch_size` (the last one partial) exactly as a
    BatchSampler does: the N-process run trains on the 1-process run's global batches. Rank r takes the r-th of
    `world_size` contiguous, near-equal slices of each; a last batch smaller than world_size is dropped (it cannot
    give every rank a sample). No set_epoch: each pass draws the next permutation from the generator, as a
    one-process loader does, so restoring the generator's state replays an epoch.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, generator: torch.Generator):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size = rank, world_size
        self.generator = generator

    def global_batches(self) -> Iterator[list[int]]:
        """The global batches of one pass (advances the generator like a one-process loader)."""
        batch: list[int] = []
        for index in RandomSampler(range(self.num_samples), generator=self.generator):
            batch.append(index)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            if len(batch) >= self.world_size:
                start, end = distributed.shard_bounds(len(batch), self.rank, self.world_size)
                yield batch[start:end]

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + (1 if rest >= self.world_size else 0)


def uses_device_resident_data(cfg, train_views: Mapping[str, str], device) -> bool:
    """DATASET.DEVICE_RESIDENT applies on CUDA to a data set with device loaders (CIFAR) when the distiller needs only
    the standard view."""
    return (
        bool(cfg.DATASET.DEVICE_RESIDENT)
        and device is not None
        and torch.device(device).type == "cuda"
        and cfg.DATASET.TYPE in DATASETS
        and DATASETS.get(cfg.DATASET.TYPE).device_loaders is not None
        and dict(train_views) == {"image": "standard"}
    )


def with_augment(train_views: Mapping[str, str], cfg) -> dict[str, str]:
    """The views to build: DATASET.AUGMENT (a view name, e.g. "deit") replaces the "standard" view when set."""
    chosen = cfg.DATASET.AUGMENT
    return {key: chosen if chosen and name == "standard" else name for key, name in train_views.items()}


def _view_id_key(cfg, needs: Mapping[str, object], train_views: Mapping[str, str]) -> str | None:
    """The batch key whose view ids the batches carry (need "view_id"), None without the need; a view or data set
    whose views cannot be enumerated is refused in one line."""
    if "view_id" not in needs:
        return None
    key = needs["view_id"]
    if key not in train_views:
        raise MdistillerError(f"view ids asked for batch key {key!r}, which is not a training view of this run "
                              f"({', '.join(train_views)})")
    reason = view_refusal(cfg.DATASET.TYPE, train_views[key])
    if reason:
        raise MdistillerError(f"the data path cannot give view ids for {key}: {reason}")
    return key


def check_batch_needs(needs: Mapping[str, object]) -> None:
    """A need no data path knows is a one-line error (a distiller asking for something the data cannot give)."""
    unknown = sorted(set(needs) - set(BATCH_NEEDS))
    if unknown:
        hint = BATCH_NEEDS.did_you_mean(unknown[0])
        raise MdistillerError(f"the data path cannot serve {', '.join(unknown)}{hint} (known batch needs: "
                              f"{', '.join(BATCH_NEEDS) or 'none'})")


def serve_batch_needs(train_set: Dataset, needs: Mapping[str, object]) -> None:
    """Make the items of a DataLoader's training set carry what `needs` asks for (drawn per item, in the workers)."""
    sampler = contrastive_sampler(train_set, needs)
    if sampler is not None:
        train_set.contrastive = sampler


def get_dataset(cfg, train_views: Mapping[str, str] | None = None, seed: int = 0, device=None,
                rank: int | None = None, world_size: int | None = None, needs: Mapping[str, object] | None = None):
    """(train_loader, val_loader, num_train, num_classes) for cfg.DATASET, mdistiller's signature.

    `needs` (a distiller's `batch_needs(cfg)`): what the training batches must carry besides the views, "target" and
    "index" (see BATCH_NEEDS).

    On CUDA with DATASET.DEVICE_RESIDENT, CIFAR lives on the GPU and is augmented there (see device_cifar.py).
    Under torchrun (rank and world_size default to the process group's) SOLVER.BATCH_SIZE is the global batch: the
    training loader yields this rank's share of each global batch (ShardedBatchSampler), the test loader this rank's
    contiguous share of the test set.
    """
    rank = distributed.rank() if rank is None else rank
    world_size = distributed.world_size() if world_size is None else world_size
    needs = dict(needs or {})
    check_batch_needs(needs)
    dataset_type = DATASETS.get(cfg.DATASET.TYPE)
    train_views = with_augment(train_views or {"image": "standard"}, cfg)
    request = DataRequest(train_views, device, _view_id_key(cfg, needs, train_views))
    num_classes = num_classes_of(cfg)
    train_set, test_set, _ = dataset_type.build(cfg, request)
    if uses_device_resident_data(cfg, train_views, device):
        train_loader, val_loader = dataset_type.device_loaders(cfg, train_set, test_set, request, needs, seed, rank,
                                                               world_size)
        return train_loader, val_loader, len(train_set), num_classes
    if dataset_type.loaders is not None:
        train_loader, val_loader = dataset_type.loaders(cfg, train_set, test_set, request, needs, seed, rank,
                                                        world_size)
        return train_loader, val_loader, len(train_set), num_classes
    serve_batch_needs(train_set, needs)
    workers = cfg.DATASET.NUM_WORKERS
    pin = torch.cuda.is_available()
    generator = torch.Generator()
    generator.manual_seed(seed)
    loader_class = getattr(train_set, "loader_class", DataLoader)  # a data set may bring its DataLoader subclass
    if world_size == 1:
        batching = {"batch_size": cfg.SOLVER.BATCH_SIZE, "shuffle": True, "worker_init_fn": seed_worker}
    else:
        sampler = ShardedBatchSampler(len(train_set), cfg.SOLVER.BATCH_SIZE, rank, world_size, generator)
        batching = {"batch_sampler": sampler, "worker_init_fn": functools.partial(seed_rank_worker, rank)}
    train_loader = loader_class(
        train_set,
        num_workers=workers,
        pin_memory=pin,
        generator=generator,
        persistent_workers=workers > 0,
        **batching,
    )
    val_loader = eval_loader(test_set, cfg.DATASET.TEST.BATCH_SIZE, workers, rank, world_size)
    return train_loader, val_loader, len(train_set), num_classes


def shutdown_workers(loader) -> None:
    """Stop the worker processes of a DataLoader's current iterator (persistent workers outlive an epoch's iterator;
    a new iterator then starts fresh ones)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None


def eval_loader(test_set: Dataset, batch_size: int, workers: int, rank: int = 0, world_size: int = 1) -> DataLoader:
    """A sequential loader over the test set, or over rank's contiguous share of it when world_size > 1."""
    loader_class = getattr(test_set, "loader_class", DataLoader)
    if world_size > 1:
        start, end = distributed.shard_bounds(len(test_set), rank, world_size)
        test_set = Subset(test_set, range(start, end))
    return loader_class(
        test_set, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=torch.cuda.is_available()
    )


def check_data(cfg) -> None:
    """That the data of DATASET.TYPE is there (or will be downloaded), without reading it: a missing folder, an
    unknown type or a class count that contradicts DATASET.NUM_CLASSES is a one-line error before any side effect."""
    num_classes_of(cfg)
    check = DATASETS.get(cfg.DATASET.TYPE).check
    if check is not None:
        check(cfg)


def get_test_set(cfg) -> Dataset:
    """The test split of cfg.DATASET with the test transform (for tools/eval.py)."""
    num_classes_of(cfg)
    return DATASETS.get(cfg.DATASET.TYPE).test_set(cfg)
