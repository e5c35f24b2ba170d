"""detectron2's input pipeline for detection: shortest-edge resize (multi-scale in training) and horizontal flip, on a
uint8 CHW image and its xyxy boxes. Every random draw comes from torch's RNG (or a given generator).

Checked against detectron2 221448e4 (data/transforms/augmentation_impl.py, transform.py, detection_utils.py): the
output size rule (int(x + 0.5) after the long-side cap), PIL bilinear on uint8, "choice" sampling of the short side
for training, flip x' = W - x after the resize, boxes scaled by new/old size per axis. Remaining difference:
detectron2 draws the short side and the flip from numpy's global RNG (np.random.choice, np.random.uniform < 0.5)
in its loader workers; here they come from torch, so the same seed gives another (equally distributed) sequence."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mdistiller.errors import MdistillerError

# detectron2's INPUT.MIN_SIZE_TRAIN / MAX_SIZE_TRAIN of every shipped config, and MIN/MAX_SIZE_TEST.
TRAIN_SHORT_EDGES = (640, 672, 704, 736, 768, 800)
TRAIN_MAX_SIZE = 1333
TEST_SHORT_EDGE = 800
TEST_MAX_SIZE = 1333


def resized_shape(height: int, width: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """(new_h, new_w) as detectron2's ResizeShortestEdge: short side to `short_edge`, long side capped, half up."""
    if height <= 0 or width <= 0:
        raise MdistillerError(f"cannot resize an image of size {height}x{width}")
    scale = short_edge / min(height, width)
    new_h, new_w = (short_edge, scale * width) if height < width else (scale * height, short_edge)
    if max(new_h, new_w) > max_size:
        cap = max_size / max(new_h, new_w)
        new_h, new_w = new_h * cap, new_w * cap
    return int(new_h + 0.5), int(new_w + 0.5)


def _box_dtype(boxes: torch.Tensor) -> torch.dtype:
    """Boxes keep a floating dtype (detectron2 moves them in float64, casting to float32 once); others become fp32."""
    return boxes.dtype if boxes.is_floating_point() else torch.float32


def resize(image: torch.Tensor, boxes: torch.Tensor, new_h: int, new_w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize a uint8 CHW image with PIL bilinear (as detectron2 does on uint8) and scale xyxy boxes to match (in
    their floating dtype; integer boxes become float32)."""
    if image.dtype != torch.uint8 or image.dim() != 3:
        raise MdistillerError(f"resize expects a uint8 CHW image, got {image.dtype} of shape {tuple(image.shape)}")
    height, width = image.shape[1:]
    hwc = image.permute(1, 2, 0).numpy()
    pil = Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc)
    out = np.asarray(pil.resize((new_w, new_h), Image.BILINEAR))
    out = torch.from_numpy(out.copy()).reshape(new_h, new_w, -1).permute(2, 0, 1).contiguous()
    dtype = _box_dtype(boxes)
    scale = torch.tensor([new_w / width, new_h / height, new_w / width, new_h / height], dtype=dtype)
    return out, boxes.to(dtype) * scale


def hflip(image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror a CHW image left-right and its xyxy boxes by x' = W - x."""
    width = image.shape[-1]
    flipped = boxes.to(_box_dtype(boxes)).clone()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return image.flip(-1), flipped


def clip_and_drop_empty(boxes: torch.Tensor, height: int, width: int, min_side: float = 1e-5) -> torch.Tensor:
    """Clip boxes to the image in place; the keep-mask drops a box with a side <= `min_side` (as detectron2)."""
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return ((boxes[:, 2] - boxes[:, 0]) > min_side) & ((boxes[:, 3] - boxes[:, 1]) > min_side)


@dataclass(frozen=True)
class Geometry:
    """What one image's transform does: resize to (new_h, new_w), then mirror when `flip`."""

    new_h: int
    new_w: int
    flip: bool = False


def apply_geometry(image: torch.Tensor, boxes: torch.Tensor, geometry: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize (skipped at the same size) then flip a uint8 CHW image and its xyxy boxes."""
    if tuple(image.shape[1:]) != (geometry.new_h, geometry.new_w):
        image, boxes = resize(image, boxes, geometry.new_h, geometry.new_w)
    boxes = boxes.to(_box_dtype(boxes))
    if geometry.flip:
        image, boxes = hflip(image, boxes)
    return image, boxes


def transform_polygon(polygon: list[float], height: int, width: int, geometry: Geometry) -> list[float]:
    """A flat [x, y, ...] polygon of a height x width image moved as apply_geometry moves the image."""
    xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2) * [geometry.new_w / width, geometry.new_h / height]
    if geometry.flip:
        xy[:, 0] = geometry.new_w - xy[:, 0]
    return xy.reshape(-1).tolist()


@dataclass(frozen=True)
class TrainAugment:
    """ResizeShortestEdge (short side drawn uniformly from `short_edges`, "choice" style) then RandomFlip(p)."""

    short_edges: tuple[int, ...] = TRAIN_SHORT_EDGES
    max_size: int = TRAIN_MAX_SIZE
    flip_prob: float = 0.5

    def draw(self, generator: torch.Generator | None = None) -> tuple[int, bool]:
        """The random choices for one image: (short edge, flip)."""
        short = self.short_edges[int(torch.randint(len(self.short_edges), (1,), generator=generator))]
        flip = bool(torch.rand((), generator=generator) < self.flip_prob)
        return short, flip

    def plan(self, height: int, width: int, generator: torch.Generator | None = None) -> Geometry:
        short, flip = self.draw(generator)
        return Geometry(*resized_shape(height, width, short, self.max_size), flip)

    def __call__(self, image: torch.Tensor, boxes: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_geometry(image, boxes, self.plan(image.shape[1], image.shape[2], generator))


@dataclass(frozen=True)
class EvalResize:
    """The deterministic single-scale test resize (no flip)."""

    short_edge: int = TEST_SHORT_EDGE
    max_size: int = TEST_MAX_SIZE

    def plan(self, height: int, width: int, generator: torch.Generator | None = None) -> Geometry:
        return Geometry(*resized_shape(height, width, self.short_edge, self.max_size))

    def __call__(self, image: torch.Tensor, boxes: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_geometry(image, boxes, self.plan(image.shape[1], image.shape[2]))


class KeepSize:
    """No resize, no flip (tests, and callers that resize elsewhere)."""

    def plan(self, height: int, width: int, generator: torch.Generator | None = None) -> Geometry:
        return Geometry(height, width)
