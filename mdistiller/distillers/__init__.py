"""Distillers by DISTILLER.TYPE. Importing a method's module registers it."""

from . import (  # noqa: F401  (registration)
    at,
    crd,
    ctkd,
    dkd,
    fitnet,
    kd,
    kdsvd,
    mlkd,
    nst,
    ofd,
    pkt,
    reviewkd,
    rkd,
    sp,
    vanilla,
    vid,
    vkd,
    wkd,
)
from ._base import Distiller
from .registry import distiller_dict, get_distiller_class, register_distiller

__all__ = ["Distiller", "distiller_dict", "get_distiller_class", "register_distiller"]
