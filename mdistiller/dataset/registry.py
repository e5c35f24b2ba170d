"""The registries of the data side: one per kind of thing, each entry registered where it is defined.

- `DATASETS`: DATASET.TYPE -> `DatasetType` (its builder and what else the type knows: class count, test split, data
  check, device-resident loaders), registered with `@register_dataset(...)` on the builder. Every builder has one
  signature: `build(cfg, request: DataRequest) -> (train set, test set, class count)`.
- `TRAIN_VIEWS` (the 32x32 CIFAR views, `(mean, std) -> transform`), `IMAGENET_VIEWS` (`(mean, std, image_size) ->
  transform`), `TINY_IMAGENET_VIEWS` (`(mean, std) -> transform`): a training view's version for each data-set family,
  by the name a distiller's `train_views` uses; registered with e.g. `@IMAGENET_VIEWS.register("strong")`.
- `BATCH_NEEDS`: what a distiller may ask the training batches to carry besides its views, "target" and "index" (its
  `batch_needs(cfg)`) -> a one-line description; registered by the module that serves the need.

This module imports nothing of the package, so every module of it can register here, and the package imports them all
(`dataset/__init__.py`, `import_submodules`) in any order.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterable, Iterator, Mapping, TypeVar

from ..errors import MdistillerError, did_you_mean

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> entries of one kind. `get` (and `registry[name]`) refuses an unknown name in one line with a
    did-you-mean; a name registers once."""

    def __init__(self, what: str, unknown: str = "unknown {what} {name!r}", known: str = "known"):
        """`what` names the kind in messages; `unknown` (formatted with what and name) opens the error of an unknown
        name and `known` labels the list of registered names that ends it."""
        self.what = what
        self._unknown = unknown
        self._known = known
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None) -> Callable[[T], T] | T:
        """Register `entry` as `name` (returns it), or without `entry` return a decorator that registers what it
        decorates. A name already registered is refused."""
        if entry is None:
            return lambda decorated: self.register(name, decorated)
        if name in self._entries:
            raise MdistillerError(f"{self.what} {name!r} is registered twice (first by "
                                  f"{_origin(self._entries[name])}, again by {_origin(entry)})")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> T:
        """Remove `name` (for tests and plugins that registered it); returns its entry."""
        return self._entries.pop(name)

    def get(self, name: str) -> T:
        """The entry registered as `name`; an unknown name is a one-line MdistillerError naming the closest match."""
        if name not in self._entries:
            head = self._unknown.format(what=self.what, name=name)
            names = ", ".join(self.names()) or "none"
            raise MdistillerError(f"{head}{self.did_you_mean(name)}; {self._known}: {names}")
        return self._entries[name]

    __getitem__ = get

    def did_you_mean(self, name: str) -> str:
        """' (did you mean X?)' for the registered name closest to `name`, '' when none is close."""
        return did_you_mean(name, self._entries)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """(name, entry) pairs, sorted by name."""
        return [(name, self._entries[name]) for name in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self.names())})"


def _origin(entry: object) -> str:
    """Where an entry was defined, for the duplicate-registration message."""
    target = getattr(entry, "build", entry)
    module, name = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    return f"{module}.{name}" if module and name else repr(entry)


@dataclass(frozen=True)
class DataRequest:
    """What a run asks of its data set's builder besides cfg.DATASET."""

    # batch key -> training view name, DATASET.AUGMENT already applied (get_dataset's with_augment)
    train_views: Mapping[str, str] = field(default_factory=lambda: {"image": "standard"})
    device: torch.device | str | None = None  # the run's device (ImageNet decodes there with DATASET.GPU_DECODE)
    # the batch key whose items also carry "view_id" (the teacher cache's need); get_dataset asks it only of a data
    # set whose views are enumerable (teacher_views.view_refusal), so the other builders never see it set
    record_views: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "train_views", MappingProxyType(dict(self.train_views)))


Builder = Callable[[Any, DataRequest], "tuple[Dataset, Dataset, int]"]


@dataclass(frozen=True)
class DatasetType:
    """Everything the data side knows about one DATASET.TYPE."""

    name: str
    build: Builder  # (cfg, request) -> (train set with the requested views, test set, class count)
    num_classes: Callable[[Any], int]  # cfg -> class count (may read the files: ImageNet counts its class folders)
    test_set: Callable[[Any], Dataset]  # cfg -> the test split with the test transform, without the training split
    check: Callable[[Any], None] | None = None  # cfg -> None: the data is there or will be (no read), else one line
    # (cfg, train set, test set, request, needs, seed, rank, world_size) -> (train loader, test loader) holding the
    # data on the CUDA device (DATASET.DEVICE_RESIDENT); None where the type cannot
    device_loaders: Callable[..., tuple] | None = None
    # what a run on this data trains (engine/tasks.py): "classification" or "detection"; a distiller declares the same
    task: str = "classification"
    # (cfg, train set, test set, request, needs, seed, rank, world_size) -> (train loader, test loader) for a type
    # whose batches are not classification's (detection's lists of images and targets); None: get_dataset's loaders
    loaders: Callable[..., tuple] | None = None


DATASETS: Registry[DatasetType] = Registry("DATASET.TYPE")
TRAIN_VIEWS: Registry[Callable] = Registry("training view")
IMAGENET_VIEWS: Registry[Callable] = Registry("ImageNet view", unknown="training view {name!r} has no ImageNet version",
                                              known="ImageNet views")
TINY_IMAGENET_VIEWS: Registry[Callable] = Registry(
    "Tiny-ImageNet view", unknown="training view {name!r} has no Tiny-ImageNet version", known="Tiny-ImageNet views")
BATCH_NEEDS: Registry[str] = Registry("batch need")


def register_dataset(*names: str, num_classes: Callable[[Any], int], test_set: Callable[[Any], Dataset],
                     check: Callable[[Any], None] | None = None,
                     device_loaders: Callable[..., tuple] | None = None, task: str = "classification",
                     loaders: Callable[..., tuple] | None = None) -> Callable[[Builder], Builder]:
    """Decorator on a builder `(cfg, request) -> (train set, test set, class count)`: register it (with the rest of
    what its data set provides, see DatasetType) as each DATASET.TYPE in `names`."""

    def wrap(build: Builder) -> Builder:
        for name in names:
            DATASETS.register(name, DatasetType(name, build, num_classes, test_set, check, device_loaders, task,
                                                      loaders))
        return build

    return wrap


def import_submodules(package: str, path: Iterable[str]) -> None:
    """Import every module of `package` (found on `path`, sorted by name), so that each registers what it defines."""
    for module in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
        importlib.import_module(f"{package}.{module.name}")
