"""Distillers register themselves by their config name (DISTILLER.TYPE); nothing else lists them."""

from __future__ import annotations

import difflib
from typing import Callable, TypeVar

from ..errors import MdistillerError
from ..log import get_logger

log = get_logger(__name__)
distiller_dict: dict = {}
# Names used by published configs for a method we register under another name: old -> (new, why).
_ALIASES: dict[str, tuple[str, str]] = {}

T = TypeVar("T")


def register_distiller(name: str, *aliases: tuple[str, str]) -> Callable[[T], T]:
    """Class decorator: make a distiller buildable as DISTILLER.TYPE `name` (aliases: (old name, reason) pairs)."""

    def wrap(cls: T) -> T:
        if name in distiller_dict:
            raise ValueError(f"distiller {name} registered twice")
        distiller_dict[name] = cls
        for old, why in aliases:
            _ALIASES[old] = (name, why)
        return cls

    return wrap


def get_distiller_class(name: str):
    """The class registered as `name`, resolving published aliases with a warning."""
    if name in _ALIASES and name not in distiller_dict:
        new, why = _ALIASES[name]
        log.warning(f"DISTILLER.TYPE {name} is read as {new}: {why}")
        name = new
    if name not in distiller_dict:
        close = difflib.get_close_matches(name, list(distiller_dict), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise MdistillerError(
            f"unknown distiller DISTILLER.TYPE {name!r}{hint}; available: {', '.join(sorted(distiller_dict))}"
        )
    return distiller_dict[name]
