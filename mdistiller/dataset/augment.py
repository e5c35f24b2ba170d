"""The "strong" training view (MLKD): weak view + RandAugment (n=2, m=10) over FixMatch's 14 ops + Cutout.

The ops follow FixMatch's RandAugmentMC as MLKD uses it: n ops drawn with replacement, each applied with probability
1/2 at a magnitude drawn uniformly from 1..m-1 (out of 10), then a Cutout square of half the image side (clipped at the
border, so up to half the side) filled with grey (125, 123, 114). Every random draw comes from torch's RNG, so a seeded
run (and each seeded DataLoader worker) reproduces its augmentations.
"""

from __future__ import annotations

from typing import Callable

import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from torchvision import transforms

from .registry import TRAIN_VIEWS

MAX_LEVEL = 10  # magnitudes are given on FixMatch's 0..10 scale
CUTOUT_FILL = (125, 123, 114)


def _uniform() -> float:
    return float(torch.rand(()))


def _coin() -> bool:
    return _uniform() < 0.5


def _float_level(v: int, max_v: float) -> float:
    return float(v) * max_v / MAX_LEVEL


def _int_level(v: int, max_v: float) -> int:
    return int(v * max_v / MAX_LEVEL)


def _signed(value: float) -> float:
    return -value if _coin() else value


def auto_contrast(img: Image.Image, v: int) -> Image.Image:
    return ImageOps.autocontrast(img)


def brightness(img: Image.Image, v: int) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(_float_level(v, 0.9) + 0.05)


def color(img: Image.Image, v: int) -> Image.Image:
    return ImageEnhance.Color(img).enhance(_float_level(v, 0.9) + 0.05)


def contrast(img: Image.Image, v: int) -> Image.Image:
    return ImageEnhance.Contrast(img).enhance(_float_level(v, 0.9) + 0.05)


def equalize(img: Image.Image, v: int) -> Image.Image:
    return ImageOps.equalize(img)


def identity(img: Image.Image, v: int) -> Image.Image:
    return img


def posterize(img: Image.Image, v: int) -> Image.Image:
    return ImageOps.posterize(img, _int_level(v, 4) + 4)


def rotate(img: Image.Image, v: int) -> Image.Image:
    return img.rotate(_signed(_int_level(v, 30)))


def sharpness(img: Image.Image, v: int) -> Image.Image:
    return ImageEnhance.Sharpness(img).enhance(_float_level(v, 0.9) + 0.05)


def shear_x(img: Image.Image, v: int) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, (1, _signed(_float_level(v, 0.3)), 0, 0, 1, 0))


def shear_y(img: Image.Image, v: int) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, _signed(_float_level(v, 0.3)), 1, 0))


def solarize(img: Image.Image, v: int) -> Image.Image:
    return ImageOps.solarize(img, 256 - _int_level(v, 256))


def translate_x(img: Image.Image, v: int) -> Image.Image:
    shift = int(_signed(_float_level(v, 0.3)) * img.size[0])
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, shift, 0, 1, 0))


def translate_y(img: Image.Image, v: int) -> Image.Image:
    shift = int(_signed(_float_level(v, 0.3)) * img.size[1])
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, shift))


# FixMatch's pool, in its order.
FIXMATCH_OPS: tuple[Callable[[Image.Image, int], Image.Image], ...] = (
    auto_contrast, brightness, color, contrast, equalize, identity, posterize,
    rotate, sharpness, shear_x, shear_y, solarize, translate_x, translate_y,
)


def cutout(img: Image.Image, size: int, fill: tuple[int, int, int] = CUTOUT_FILL) -> Image.Image:
    """A `size` x `size` square at a uniform random centre, clipped at the border, painted `fill`."""
    w, h = img.size
    x0 = int(max(0.0, _uniform() * w - size / 2.0))
    y0 = int(max(0.0, _uniform() * h - size / 2.0))
    x1 = int(min(w, x0 + size))
    y1 = int(min(h, y0 + size))
    img = img.copy()
    ImageDraw.Draw(img).rectangle((x0, y0, x1, y1), fill)
    return img


class FixMatchRandAugment:
    """RandAugment as FixMatch's RandAugmentMC: `n` random ops (p = 1/2 each, level in 1..m-1), then Cutout."""

    def __init__(self, n: int = 2, m: int = 10, cutout_fraction: float = 0.5, fill: tuple = CUTOUT_FILL):
        self.n = n
        self.m = m
        self.cutout_fraction = cutout_fraction
        self.fill = tuple(fill)

    def __call__(self, img: Image.Image) -> Image.Image:
        for index in torch.randint(len(FIXMATCH_OPS), (self.n,)).tolist():
            level = int(torch.randint(1, self.m, ()))
            if _coin():
                img = FIXMATCH_OPS[index](img, level)
        return cutout(img, int(img.size[0] * self.cutout_fraction), self.fill)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, m={self.m}, cutout_fraction={self.cutout_fraction})"


@TRAIN_VIEWS.register("strong")
def strong_train_transform(mean: tuple, std: tuple) -> Callable:
    """RandomCrop(32, padding 4) + flip + RandAugment(2, 10) + Cutout + normalise: MLKD's strong view."""
    return transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        FixMatchRandAugment(n=2, m=10),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
