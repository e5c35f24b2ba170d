"""The DeiT training augmentation as an ImageNet view named "deit" (DATASET.AUGMENT deit), built by timm.

timm's `create_transform` with DeiT's settings: RandomResizedCrop with bicubic interpolation, flip, RandAugment
`rand-m9-mstd0.5-inc1`, colour jitter 0.3 (unused by timm when RandAugment is on, as in DeiT), normalisation, then
random erasing with p 0.25 (pixel mode). Mixup/CutMix and label smoothing are batch-level: DATASET.MIXUP
(dataset/mixing.py). timm is the optional `[vit]` extra, imported only when the view is built.
"""

from __future__ import annotations

from typing import Callable

from ..errors import MdistillerError
from .registry import IMAGENET_VIEWS

DEIT_RAND_AUGMENT = "rand-m9-mstd0.5-inc1"
DEIT_COLOR_JITTER = 0.3
DEIT_RANDOM_ERASING = 0.25


@IMAGENET_VIEWS.register("deit")
def deit_train_transform(mean: tuple, std: tuple, image_size: int = 224) -> Callable:
    """DeiT's training transform at `image_size` (timm's create_transform)."""
    try:
        from timm.data import create_transform
    except ImportError:
        raise MdistillerError('DATASET.AUGMENT deit is timm\'s DeiT transform: install it with pip install -e ".[vit]"'
                              ) from None
    return create_transform(
        input_size=image_size, is_training=True, color_jitter=DEIT_COLOR_JITTER, auto_augment=DEIT_RAND_AUGMENT,
        interpolation="bicubic", re_prob=DEIT_RANDOM_ERASING, re_mode="pixel", re_count=1,
        mean=tuple(mean), std=tuple(std),
    )
