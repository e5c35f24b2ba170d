"""DATASET.GPU_DECODE: ImageNet training batches whose JPEG files are decoded on the device, batched.

The loader's workers read each file's bytes and its size from the JPEG header (no pixel decoding), and draw the
RandomResizedCrop box and the flip coin from the same seeded torch RNG, in the same order, as the PIL path's
transforms (so a resumed run replays its crops). The main process then decodes the whole batch with one
`torchvision.io.decode_jpeg(list, device=...)` call and crops, resizes (bilinear, antialiased, rounded to uint8 as
PIL does), flips and normalises on the device. Files the device decoder does not take (CMYK JPEGs, PNGs named .JPEG:
ImageNet holds a few) are decoded by PIL in the worker, exactly as on the PIL path, and ride along as uint8 tensors.

The functions below are pure tensor code: with device "cpu" they run the same path in tests and in the CPU bench.
"""

from __future__ import annotations

import io
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import default_collate
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

# What RandomResizedCrop(S) draws with its defaults: the PIL path's distribution.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# PIL modes of a JPEG the device decoder turns into RGB as PIL's convert("RGB") does (CMYK/YCCK go to PIL).
DEVICE_MODES = ("RGB", "L")
ENCODED_KEYS = ("data", "box", "flip", "path")  # what an encoded item holds besides what the batch carries on


def read_encoded(path: str) -> tuple[torch.Tensor, Image.Image]:
    """(image, header): the file's bytes as a 1-D uint8 tensor when the device decoder takes it (a baseline
    or progressive RGB/grey JPEG), else the image decoded by PIL as a CHW uint8 tensor; `header` is the PIL image
    opened on the bytes (its size is known, its pixels are not decoded). Raises on an unreadable file."""
    with open(path, "rb") as f:
        data = f.read()
    image = Image.open(io.BytesIO(data))  # parses the header only
    if image.format == "JPEG" and image.mode in DEVICE_MODES:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), image
    rgb = np.asarray(image.convert("RGB"))  # the PIL path's decode: fails here on a corrupt file
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous(), image


def draw_crop(image: Image.Image | torch.Tensor, scale: Sequence[float] = CROP_SCALE,
              ratio: Sequence[float] = CROP_RATIO) -> tuple[torch.Tensor, bool]:
    """(box (top, left, height, width), flip) for an image of this size: RandomResizedCrop's box then
    RandomHorizontalFlip's coin, drawn from torch's RNG in the order the PIL path's Compose draws them."""
    box = transforms.RandomResizedCrop.get_params(image, list(scale), list(ratio))  # reads the size only
    flip = bool(torch.rand(1) < 0.5)
    return torch.tensor(box, dtype=torch.long), flip


def collate_encoded(items: list[dict]) -> dict:
    """default_collate, except that the images (encoded bytes or decoded tensors of any size) stay a list."""
    images = [item.pop("data") for item in items]
    batch = default_collate(items)
    batch["data"] = images
    return batch


def decode_images(images: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor | Exception]:
    """Each image as a CHW uint8 RGB tensor on `device`: encoded ones (1-D) decoded in one batched decode_jpeg call,
    already decoded ones (3-D) moved. An image the device decoder rejects is decoded on the CPU; one that no decoder
    reads is returned as its exception, for the caller to raise or skip."""
    device = torch.device(device)
    out: list[torch.Tensor | Exception] = [image.to(device, non_blocking=True) if image.dim() == 3 else image
                                           for image in images]
    encoded = [i for i, image in enumerate(images) if image.dim() == 1]
    if not encoded:
        return out
    try:
        decoded = decode_jpeg([images[i] for i in encoded], mode=ImageReadMode.RGB, device=device)
        for i, image in zip(encoded, decoded):
            out[i] = image
        return out
    except RuntimeError:
        pass  # one bad file fails the whole batched call: find it image by image
    for i in encoded:
        try:
            out[i] = decode_jpeg(images[i], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            try:
                out[i] = decode_image(images[i].cpu(), mode=ImageReadMode.RGB).to(device)
            except RuntimeError as exc:
                out[i] = exc
    return out


def resized_crop(image: torch.Tensor, box: Sequence[int], size: int, flip: bool,
                 uint8_resize: bool | None = None) -> torch.Tensor:
    """CHW uint8 -> 3xSxS float in [0, 255] holding integers: crop to box (top, left, height, width), bilinear
    antialiased resize to S x S rounded as PIL's uint8 output, then the horizontal flip. `uint8_resize` (default:
    on CPU tensors) resizes the uint8 tensor directly, CPU only and ~6x faster there than in float."""
    top, left, height, width = (int(v) for v in box)
    crop = image[:, top:top + height, left:left + width].unsqueeze(0)
    if uint8_resize if uint8_resize is not None else image.device.type == "cpu":
        out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0].float()
    else:  # CUDA's antialiased kernel takes floating point only
        out = F.interpolate(crop.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        out = out.round_().clamp_(0, 255)
    return out.flip(-1) if flip else out


def normalize(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Nx3xSxS values in [0, 255] -> (x / 255 - mean) / std, as ToTensor + Normalize."""
    mean_t = torch.tensor(mean, device=batch.device, dtype=batch.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=batch.device, dtype=batch.dtype).view(1, -1, 1, 1)
    return (batch / 255.0 - mean_t) / std_t


def transform_batch(images: Sequence[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor, size: int,
                    mean: Sequence[float], std: Sequence[float], uint8_resize: bool | None = None) -> torch.Tensor:
    """Decoded CHW uint8 images (on the device) -> the normalised Nx3xSxS float batch of the standard view."""
    crops = [resized_crop(image, box, size, flip, uint8_resize)
             for image, box, flip in zip(images, boxes.tolist(), flips.tolist())]
    return normalize(torch.stack(crops), mean, std)


def decode_batch(batch: dict, device: torch.device | str, size: int, mean: Sequence[float], std: Sequence[float],
                 on_bad: Callable[[str, Exception], None]) -> dict | None:
    """A collated batch of encoded images -> {"image", "target", "index", ...} on `device`. `on_bad(path, exc)` raises,
    or returns to drop that image (None when every image of the batch was dropped)."""
    images = decode_images(batch["data"], device)
    keep = []
    for i, image in enumerate(images):
        if isinstance(image, Exception):
            on_bad(batch["path"][i], image)
        else:
            keep.append(i)
    if not keep:
        return None
    rows = torch.tensor(keep, dtype=torch.long)
    image = transform_batch([images[i] for i in keep], batch["box"][rows], batch["flip"][rows], size, mean, std)
    carried = {key: value[rows] for key, value in batch.items() if key not in ENCODED_KEYS and torch.is_tensor(value)}
    return {"image": image, **carried}  # "target", "index" and any batch need such as "contrastive_index"
