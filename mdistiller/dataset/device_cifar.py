"""CIFAR kept on the training device, augmented with batched tensor ops: no worker processes, no PIL, no host sync.

The standard view is reproduced exactly in distribution: RandomCrop(32, padding 4) draws each offset uniformly from
0..8 on both axes of the zero-padded image, the flip is a fair coin, then ToTensor's /255 and the per-channel
normalisation. Random numbers come from one seeded `torch.Generator` on the data's device, whose state the trainer
saves for resume exactly like the DataLoader's sampler generator.

With `record_views`, each training batch also carries "view_id": which of the 162 enumerable views (9 x 9 crop
offsets x 2 flips, `encode_views`) each image is, for the teacher-output cache (engine/teacher_cache.py).

Under torchrun (world_size > 1) every rank holds the whole set and the same generator: each draws the one-process
run's permutation and, per global batch, the augmentation numbers of the whole global batch, then keeps its own
contiguous slice. The ranks thus train on exactly the one-process run's augmented global batches, each image with
its own random numbers. The test loader gives each rank a contiguous share of the test set.

With a ContrastiveSampler (CRD's "contrastive_index" need) every training batch also carries `contrastive_index`,
drawn on the device from the same generator right after the batch's crop/flip numbers, for the whole global batch
under torchrun (each rank keeps its slice): resume replays it with the generator, and no batch reads the host.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from ..distributed import shard_bounds
from .contrastive import ContrastiveSampler

PAD = 4
SIZE = 32
OFFSETS = 2 * PAD + 1  # crop offsets per axis: 0..8
VIEWS_PER_IMAGE = OFFSETS * OFFSETS * 2  # 162: every training view of the standard recipe
VIEW_ORDER = (f"view = ({OFFSETS} * dy + dx) * 2 + flip, with (dy, dx) the crop's top-left corner in the image "
              f"zero-padded by {PAD} (0..{2 * PAD}) and flip 1 when the crop is mirrored; "
              f"table row = index * {VIEWS_PER_IMAGE} + view")


def encode_views(offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """View ids (B,) int64 of crops at `offsets` (B, 2: row, column) mirrored where `flips` (see VIEW_ORDER)."""
    return (offsets[:, 0].long() * OFFSETS + offsets[:, 1].long()) * 2 + flips.long()


def decode_views(view_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(offsets (B, 2), flips (B,) bool) of view ids: the inverse of encode_views."""
    view_ids = view_ids.long()
    position, flips = view_ids // 2, (view_ids % 2).bool()
    return torch.stack([position // OFFSETS, position % OFFSETS], dim=1), flips


def random_crop_flip(
    images: torch.Tensor, generator: torch.Generator, pad: int = PAD
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop each uint8 (B, C, H, W) image at a random offset of its zero-padded copy and flip half of them.

    Returns the augmented batch and the drawn offsets (B, 2) and flips (B,) so tests can check the distribution.
    """
    offsets, flips = draw_crop_flip(images.shape[0], generator, images.device, pad)
    return crop_flip(images, offsets, flips, pad), offsets, flips


def draw_crop_flip(batch: int, generator: torch.Generator, device: torch.device,
                   pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """The random numbers of random_crop_flip for `batch` images: offsets (B, 2) in 0..2*pad and flips (B,)."""
    offsets = torch.randint(0, 2 * pad + 1, (batch, 2), generator=generator, device=device)
    flips = torch.rand(batch, generator=generator, device=device) < 0.5
    return offsets, flips


def crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int = PAD) -> torch.Tensor:
    """Crop each uint8 (B, C, H, W) image of its zero-padded copy at `offsets` and mirror where `flips`."""
    batch, _, height, width = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    rows = offsets[:, 0:1] + torch.arange(height, device=device)  # (B, H)
    cols = offsets[:, 1:2] + torch.arange(width, device=device)  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)  # a flip is a crop read right to left
    sample = torch.arange(batch, device=device)[:, None, None]
    crops = padded.permute(0, 2, 3, 1)[sample, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return crops.permute(0, 3, 1, 2)


def normalize_uint8(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 `(x / 255 - mean) / std`, as ToTensor + Normalize."""
    return (images.float().div_(255.0) - mean) / std


class DeviceCifarLoader:
    """An epoch-by-epoch iterator over device-resident CIFAR batches (dicts with image, target, index).

    Same contract as the DataLoader path: shuffled without replacement each epoch (train), `ceil(N / batch)` batches,
    the last one partial, and a `generator` attribute holding the random state. With world_size > 1, `batch_size`
    is the global batch and rank gets its slice of each (a last batch smaller than world_size is dropped), or, for
    the test set, its contiguous share of the samples. With `contrastive` (a sampler over these labels, on `device`)
    training batches also hold "contrastive_index"; with `record_views`, "view_id".
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, mean: tuple, std: tuple,
                 device: torch.device, train: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 contrastive: ContrastiveSampler | None = None, record_views: bool = False):
        self.device = torch.device(device)
        self.images = torch.as_tensor(images).permute(0, 3, 1, 2).contiguous().to(self.device)  # uint8 NCHW
        self.labels = torch.as_tensor(labels, dtype=torch.long).to(self.device)
        self.batch_size = batch_size
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.train = train
        self.record_views = record_views
        self.rank, self.world_size = rank, world_size
        self.shard = (0, len(self.labels)) if train else shard_bounds(len(self.labels), rank, world_size)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.contrastive = contrastive if train else None

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.train and self.world_size > 1:
            full, rest = divmod(len(self.labels), self.batch_size)
            return full + (1 if rest >= self.world_size else 0)
        return -(-(self.shard[1] - self.shard[0]) // self.batch_size)

    @property
    def dataset(self) -> torch.Tensor:
        """What `len(loader.dataset)` counts for a DataLoader: the samples (here, the labels tensor)."""
        return self.labels

    def __iter__(self) -> Iterator[dict]:
        count = len(self.labels)
        if not self.train:
            order = torch.arange(*self.shard, device=self.device)
            for start in range(0, len(order), self.batch_size):
                index = order[start:start + self.batch_size]
                yield self._batch(index, self.images[index])
            return
        order = torch.randperm(count, generator=self.generator, device=self.device)
        for start in range(0, count, self.batch_size):
            index = order[start:start + self.batch_size]
            offsets, flips = draw_crop_flip(len(index), self.generator, self.device)
            extra = {}
            if self.contrastive is not None:
                extra["contrastive_index"] = self.contrastive.draw(index, self.labels[index], self.generator)
            if self.world_size > 1:  # the global batch's numbers were drawn: keep this rank's slice
                if len(index) < self.world_size:
                    continue
                lo, hi = shard_bounds(len(index), self.rank, self.world_size)
                index, offsets, flips = index[lo:hi], offsets[lo:hi], flips[lo:hi]
                extra = {key: value[lo:hi] for key, value in extra.items()}
            if self.record_views:
                extra["view_id"] = encode_views(offsets, flips)
            yield self._batch(index, crop_flip(self.images[index], offsets, flips), extra)

    def _batch(self, index: torch.Tensor, images: torch.Tensor, extra: dict | None = None) -> dict:
        return {"image": normalize_uint8(images, self.mean, self.std), "target": self.labels[index], "index": index,
                **(extra or {})}
