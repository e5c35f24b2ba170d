"""CIFAR kept on the training device, augmented with batched tensor ops: no worker processes, no PIL, no host sync.

The standard view is reproduced exactly in distribution: RandomCrop(32, padding 4) draws each offset uniformly from
0..8 on both axes of the zero-padded image, the flip is a fair coin, then ToTensor's /255 and the per-channel
normalisation. Random numbers come from one seeded `torch.Generator` on the data's device, whose state the trainer
saves for resume exactly like the DataLoader's sampler generator.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

PAD = 4
SIZE = 32


def random_crop_flip(
    images: torch.Tensor, generator: torch.Generator, pad: int = PAD
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop each uint8 (B, C, H, W) image at a random offset of its zero-padded copy and flip half of them.

    Returns the augmented batch and the drawn offsets (B, 2) and flips (B,) so tests can check the distribution.
    """
    batch, _, height, width = images.shape
    device = images.device
    offsets = torch.randint(0, 2 * pad + 1, (batch, 2), generator=generator, device=device)
    flips = torch.rand(batch, generator=generator, device=device) < 0.5
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    rows = offsets[:, 0:1] + torch.arange(height, device=device)  # (B, H)
    cols = offsets[:, 1:2] + torch.arange(width, device=device)  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)  # a flip is a crop read right to left
    sample = torch.arange(batch, device=device)[:, None, None]
    crops = padded.permute(0, 2, 3, 1)[sample, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return crops.permute(0, 3, 1, 2), offsets, flips


def normalize_uint8(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 `(x / 255 - mean) / std`, as ToTensor + Normalize."""
    return (images.float().div_(255.0) - mean) / std


class DeviceCifarLoader:
    """An epoch-by-epoch iterator over device-resident CIFAR batches (dicts with image, target, index).

    Same contract as the DataLoader path: shuffled without replacement each epoch (train), `ceil(N / batch)` batches,
    the last one partial, and a `generator` attribute holding the random state.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, mean: tuple, std: tuple,
                 device: torch.device, train: bool, seed: int = 0):
        self.device = torch.device(device)
        self.images = torch.as_tensor(images).permute(0, 3, 1, 2).contiguous().to(self.device)  # uint8 NCHW
        self.labels = torch.as_tensor(labels, dtype=torch.long).to(self.device)
        self.batch_size = batch_size
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.train = train
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        """Batches per epoch."""
        return -(-len(self.labels) // self.batch_size)

    @property
    def dataset(self) -> torch.Tensor:
        """What `len(loader.dataset)` counts for a DataLoader: the samples (here, the labels tensor)."""
        return self.labels

    def __iter__(self) -> Iterator[dict]:
        count = len(self.labels)
        if self.train:
            order = torch.randperm(count, generator=self.generator, device=self.device)
        else:
            order = torch.arange(count, device=self.device)
        for start in range(0, count, self.batch_size):
            index = order[start:start + self.batch_size]
            images = self.images[index]
            if self.train:
                images = random_crop_flip(images, self.generator)[0]
            yield {"image": normalize_uint8(images, self.mean, self.std), "target": self.labels[index],
                   "index": index}
