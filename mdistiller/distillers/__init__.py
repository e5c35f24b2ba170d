"""Distillers by DISTILLER.TYPE. Every module of this package (and of the MDISTILLER_METHODS folders) is imported
here; a method registers itself with `@register_distiller` and declares its config section beside its class."""

from ._base import FEATURES, LOGITS, TRAIN_MODE, Declaration, Distiller, cross_entropy, logits_on
from .config import Key, config_section, method_sections
from .registry import discover, distiller_dict, get_distiller_class, register_distiller, resolve_name

discover(__name__, __path__)

__all__ = [
    "FEATURES",
    "LOGITS",
    "TRAIN_MODE",
    "Declaration",
    "Distiller",
    "Key",
    "config_section",
    "cross_entropy",
    "distiller_dict",
    "get_distiller_class",
    "logits_on",
    "method_sections",
    "register_distiller",
    "resolve_name",
]
