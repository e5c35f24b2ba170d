"""The feature probe: one dry forward that tells a distiller the shapes of its models' features.

A method that sizes extra modules from the models (FitNet's regressor, VID's regressors, ReviewKD's channel and
shape lists, WKD-F's projector, VkD's projection) calls `probe_features` in its constructor; nothing else runs the
models before training. Two ways, chosen by the method:

- clean (the default of every method): a zero image through each model in eval mode, each model's mode restored
  afterwards. No buffer changes, no draw from any random generator.
- upstream (FITNET.UPSTREAM_PROBE / VID.UPSTREAM_PROBE): mdistiller's `get_feat_shapes`. One `torch.randn(1, 3, H,
  W)` image, drawn from the global (CPU) generator, goes through the student then the teacher, both in train mode
  under no_grad: every BN layer's running mean and variance move by its momentum (0.1) toward that noise image's
  statistics and its num_batches_tracked grows by one, the teacher's included (which then trains with those
  statistics in eval mode). Modes are restored afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..errors import MdistillerError

CIFAR_INPUT_SIZE = (32, 32)
TINY_IMAGENET_SIZE = 64  # Tiny-ImageNet trains on its 64 x 64 images as they are (no resize)


@dataclass(frozen=True)
class Setting:
    """What a method's build reads of the run besides its own keys: the pair's names (for messages) and the data
    set's training input size (for dry forwards)."""

    student: str = "student"
    teacher: str = "teacher"
    dataset: str = "cifar100"
    image_size: int = 224  # DATASET.IMAGE_SIZE (ImageNet)

    @classmethod
    def from_cfg(cls, cfg) -> Setting:
        """The setting of a run config."""
        return cls(str(cfg.DISTILLER.STUDENT), str(cfg.DISTILLER.TEACHER), str(cfg.DATASET.TYPE),
                   int(cfg.DATASET.IMAGE_SIZE))

    @property
    def names(self) -> tuple[str, str]:
        """(student, teacher) names as the config gives them."""
        return self.student, self.teacher


DEFAULT_SETTING = Setting()


def training_size(setting: Setting) -> tuple[int, int] | None:
    """The input size a run of another data set than CIFAR trains at (None for CIFAR: the method's key decides)."""
    if setting.dataset == "imagenet":
        return (int(setting.image_size),) * 2
    if setting.dataset == "tiny_imagenet":
        return (TINY_IMAGENET_SIZE,) * 2
    return None


def probe_input_size(setting: Setting, configured, key: str = "INPUT_SIZE") -> tuple[int, int]:
    """The input size of a dry forward that reads feature shapes: the method's INPUT_SIZE key on CIFAR; elsewhere the
    data set's training size (DATASET.IMAGE_SIZE on ImageNet, 64 on Tiny-ImageNet). The authors' ImageNet WKD-F
    configs leave WKD.INPUT_SIZE at its CIFAR default; a key set to anything else must equal the training size: the
    shapes read at another size would not be those the run trains on."""
    configured = tuple(int(v) for v in configured)
    training = training_size(setting)
    if training is None:
        return configured
    if configured == CIFAR_INPUT_SIZE:
        return training
    if configured != training:
        raise MdistillerError(
            f"{key} {configured} differs from the training size {training[0]}: the feature shapes must be read at the "
            f"training size; set {key} {training} (or leave it at its CIFAR default {CIFAR_INPUT_SIZE})"
        )
    return configured


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def probe_features(models: Sequence[nn.Module], input_size, upstream: bool = False) -> list[dict]:
    """Each model's feats dict for one (1, 3, *input_size) image: clean (zeros, eval mode) or upstream (one noise
    image from the global generator, train mode: BN running statistics move); see the module docstring."""
    size = tuple(int(v) for v in input_size)
    noise = torch.randn(1, 3, *size) if upstream else None  # drawn once, on the CPU generator, as upstream
    outputs = []
    for model in models:
        mode = model.training
        model.train(upstream)
        try:
            image = noise.to(_device(model)) if noise is not None else torch.zeros(1, 3, *size, device=_device(model))
            _, feats = model(image)
        finally:
            model.train(mode)
        outputs.append(feats)
    return outputs


def map_shapes(feats: dict, key: str = "feats") -> list[tuple[int, ...]]:
    """The shapes of the maps listed under `key` of a feats dict (empty when the model has none)."""
    return [tuple(f.shape) for f in feats.get(key) or []]
