"""Distillers register themselves by their config name (DISTILLER.TYPE); nothing else lists them.

`discover()` imports every module of this package, then the modules of the folders named in the environment variable
MDISTILLER_METHODS (os.pathsep-separated; each `*.py` file is imported) and of the entry points in the group
`mdistiller.methods`: a method outside the package is one file on that path, registered the same way.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys
from importlib.metadata import entry_points
from typing import Callable, TypeVar

from ..errors import MdistillerError, did_you_mean
from ..log import get_logger

log = get_logger(__name__)
distiller_dict: dict = {}
# Names used by published configs for a method we register under another name: old -> (new, why).
_ALIASES: dict[str, tuple[str, str]] = {}
METHODS_PATH_VARIABLE = "MDISTILLER_METHODS"
ENTRY_POINT_GROUP = "mdistiller.methods"

T = TypeVar("T")


def register_distiller(name: str, *aliases: tuple[str, str]) -> Callable[[T], T]:
    """Class decorator: make a distiller buildable as DISTILLER.TYPE `name` (aliases: (old name, reason) pairs). The
    class must declare its own `declares` (a Declaration)."""

    def wrap(cls: T) -> T:
        if name in distiller_dict and distiller_dict[name] is not cls:
            raise ValueError(f"distiller {name} registered twice")
        if "declares" not in vars(cls):
            raise TypeError(f"distiller {name} ({cls.__name__}) must declare `declares = Declaration(...)`")
        distiller_dict[name] = cls
        for old, why in aliases:
            _ALIASES[old] = (name, why)
        return cls

    return wrap


def resolve_name(name: str) -> str:
    """The registered name for DISTILLER.TYPE `name` (a published alias is mapped, with a warning)."""
    if name in _ALIASES and name not in distiller_dict:
        new, why = _ALIASES[name]
        log.warning(f"DISTILLER.TYPE {name} is read as {new}: {why}")
        return new
    return name


def get_distiller_class(name: str):
    """The class registered as `name`, resolving published aliases with a warning."""
    name = resolve_name(name)
    if name not in distiller_dict:
        hint = did_you_mean(name, distiller_dict)
        raise MdistillerError(
            f"unknown distiller DISTILLER.TYPE {name!r}{hint}; available: {', '.join(sorted(distiller_dict))}"
        )
    return distiller_dict[name]


def _import_file(path: str) -> None:
    module_name = f"mdistiller_methods.{os.path.splitext(os.path.basename(path))[0]}"
    if module_name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise MdistillerError(f"{METHODS_PATH_VARIABLE}: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[module_name]
        raise


def discover(package: str, package_path: list[str]) -> None:
    """Import every module of the distillers package, of the MDISTILLER_METHODS folders and of the entry points."""
    for info in sorted(pkgutil.iter_modules(package_path), key=lambda i: i.name):
        importlib.import_module(f"{package}.{info.name}")
    for folder in filter(None, os.environ.get(METHODS_PATH_VARIABLE, "").split(os.pathsep)):
        if not os.path.isdir(folder):
            raise MdistillerError(f"{METHODS_PATH_VARIABLE} names {folder}, which is not a folder")
        for entry in sorted(os.listdir(folder)):
            if entry.endswith(".py") and not entry.startswith("_"):
                _import_file(os.path.join(folder, entry))
    try:
        plugins = entry_points(group=ENTRY_POINT_GROUP)
    except TypeError:  # Python 3.9: a dict of groups
        plugins = entry_points().get(ENTRY_POINT_GROUP, [])
    for entry in plugins:
        entry.load()
