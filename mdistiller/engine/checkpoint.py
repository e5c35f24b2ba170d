"""Checkpoints in mdistiller's format, written atomically, loaded with errors a user can act on.

Format (mdistiller's): `torch.save`d dicts. Student and teacher files hold `{"model": state_dict}` (we add the
architecture's name under "arch" for better errors; readers that only look at "model" are unaffected). The trainer's
`latest` also holds "optimizer", "epoch", "best_acc" and our resume state.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import MdistillerError
from ..files import atomic_write
from ..log import get_logger
from ..models import cifar_model_dict, imagenet_model_dict, tiny_imagenet_model_dict
from ..models.common import classifier_name, drop_classifier_bias

log = get_logger(__name__)


def save_checkpoint(obj: Mapping[str, Any], path: str) -> None:
    """Atomically `torch.save` obj to path."""
    try:
        atomic_write(path, lambda f: torch.save(obj, f), "wb")
    except OSError as exc:
        raise MdistillerError(
            f"could not write checkpoint {path}: {exc.strerror or exc}; the previous file there is intact"
        ) from None


def load_checkpoint(path: str, what: str = "checkpoint") -> dict:
    """torch.load a checkpoint onto the CPU; a missing or unreadable file raises MdistillerError."""
    if not os.path.isfile(path):
        raise MdistillerError(f"{what} not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a corrupt file (pickle, zip, EOF, runtime)
        raise MdistillerError(f"{what} {path} is unreadable ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(obj, dict):
        raise MdistillerError(f"{what} {path} holds a {type(obj).__name__}, not a state dict or {{'model': ...}}")
    return obj


def extract_state_dict(obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint: `{"model": sd}` (mdistiller), `{"state_dict": sd}` or a bare state dict,
    with DataParallel's `module.` prefixes removed."""
    for key in ("model", "state_dict"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    return strip_module_prefix({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)})


def strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A state dict without the `module.` prefix DataParallel/DistributedDataParallel put on every key (when all
    keys carry it; otherwise unchanged)."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def guess_architecture(state_dict: Mapping[str, torch.Tensor], num_classes: int) -> str | None:
    """Name the zoo model (CIFAR, then ImageNet, then Tiny-ImageNet) whose state-dict keys and shapes match exactly
    (built on the meta device: no memory). timm models are tried only when timm is installed."""
    signature = {k: tuple(v.shape) for k, v in state_dict.items()}
    classes = {tuple(v.shape)[0] for k, v in state_dict.items()
               if k.endswith(("fc.weight", "classifier.weight", "head.weight")) and v.dim() == 2}
    zoos = [("", cifar_model_dict), (" (ImageNet zoo)", imagenet_model_dict),
            (" (Tiny-ImageNet zoo)", tiny_imagenet_model_dict)]
    for zoo_label, zoo in zoos:
        for name, (builder, _) in zoo.items():
            for n in sorted({num_classes, *classes}):
                try:
                    with torch.device("meta"):
                        model = builder(num_classes=n)
                except (ImportError, MdistillerError):  # an optional extra (timm) is not installed
                    break
                if {k: tuple(v.shape) for k, v in model.state_dict().items()} == signature:
                    return (name if n == num_classes else f"{name} with {n} classes") + zoo_label
    return None


def lacks_only_classifier_bias(model: nn.Module, found: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether weights (name -> shape) are exactly the model's without its classifier's bias (CAT-KD's student)."""
    try:
        bias = f"{classifier_name(model)}.bias"
    except MdistillerError:  # no classifier
        return False
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return bias in expected and {k: s for k, s in expected.items() if k != bias} == dict(found)


def load_model_weights(model: nn.Module, path: str, arch: str, num_classes: int, what: str = "checkpoint") -> None:
    """Load a checkpoint file into `model` (architecture `arch`) strictly; a mismatch names both architectures. A
    file whose only missing weight is the classifier's bias (a student trained without one) drops the model's."""
    obj = load_checkpoint(path, what)
    state_dict = extract_state_dict(obj)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    if expected != found and lacks_only_classifier_bias(model, found):
        drop_classifier_bias(model)
        log.info(f"{what} {path} has no {classifier_name(model)}.bias (trained without a classifier bias, as "
                 f"CAT-KD's student): {arch} is loaded without one")
        expected = found
    if expected == found:
        model.load_state_dict(state_dict, strict=True)
        return
    saved_arch = obj.get("arch") if isinstance(obj.get("arch"), str) else None
    other = saved_arch or guess_architecture(state_dict, num_classes) or "an unknown architecture"
    missing = sorted(set(expected) - set(found))
    wrong_shape = [k for k in expected if k in found and expected[k] != found[k]]
    if wrong_shape:
        k = wrong_shape[0]
        detail = f"{k} is {list(found[k])} in the file, {list(expected[k])} in {arch}"
    elif missing:
        detail = f"{len(missing)} weights of {arch} are missing, e.g. {missing[0]}"
    else:
        detail = f"the file has {len(set(found) - set(expected))} weights that {arch} lacks"
    raise MdistillerError(
        f"{what} {path} holds weights of {other}, not {arch} ({num_classes} classes): {detail}"
    )
