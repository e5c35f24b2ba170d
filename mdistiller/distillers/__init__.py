"""Distillers by DISTILLER.TYPE. Importing a method's module registers it."""

from . import crd, ctkd, dkd, kd, mlkd, vanilla, vkd, wkd  # noqa: F401  (registration)
from ._base import Distiller
from .registry import distiller_dict, get_distiller_class, register_distiller

__all__ = ["Distiller", "distiller_dict", "get_distiller_class", "register_distiller"]
