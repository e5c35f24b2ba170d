"""CRD's contrastive indices: for every training sample, a positive and K negatives from the other classes.

The batch need "contrastive_index" (a distiller's `batch_needs(cfg)`: `{"contrastive_index": {"k": K, "mode": M}}`)
makes each training batch carry `contrastive_index`, int64 (B, K + 1):
- column 0, the positive: the sample's own index (mode "exact"), or an index drawn uniformly from the samples of its
  class, itself included (mode "relax");
- columns 1..K, the negatives: indices drawn uniformly from the samples of the other classes, without replacement
  when they number at least K (upstream's CIFAR rule, row by row), with replacement otherwise; a data set may ask for
  replacement always (`contrastive_replacement = "always"`: upstream's ImageNet and Tiny-ImageNet folders).

One definition serves both data paths: `ContrastiveSampler.draw(index, target, generator)`, vectorised over rows.
The DataLoader path calls it per item (one row, torch's global RNG: the worker's seeded one, or the main process's,
which the trainer saves for resume); the device-resident CIFAR path calls it once per global batch on the device,
from the loader's seeded generator (no host sync). Rows consume the generator one after the other, so for one CPU
generator state a call for B rows returns what B one-row calls return (when all rows take the same branch, as on
any data set whose classes are equally large). A CUDA generator gives other numbers than a CPU one for the same seed.

Without replacement, each row draws one uniform key per training sample and takes the K smallest keys outside its
class (a uniform K-subset); "relax" takes the positive as the smallest key inside the class. With replacement a row
draws K (K + 1 for "relax") 62-bit integers and maps them onto the other classes' samples (and its own class's).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch.utils.data import Dataset

from ..errors import MdistillerError
from .registry import BATCH_NEEDS

MODES = ("exact", "relax")
REPLACEMENT_RULES = ("when_needed", "always")
# Range of the integers drawn for sampling with replacement: their remainders modulo a class size (at most a few
# million) are uniform to within 1e-12.
_WIDE = 2**62
_EXCLUDED = 2.0  # a key above every uniform draw in [0, 1): never among the K smallest

BATCH_NEEDS.register("contrastive_index", 'CRD\'s positive and K negatives per sample: {"k": K, "mode": "exact" | '
                                          '"relax"}; served per item (DataLoader sets) or per batch (device CIFAR)')


class ContrastiveSampler:
    """Draws `contrastive_index` rows for the samples of one training set (labels: its class labels, on the device
    where the draws happen)."""

    def __init__(self, labels: torch.Tensor, k: int, mode: str = "exact", replacement: str = "when_needed"):
        if mode not in MODES:
            raise MdistillerError(f"CRD.MODE {mode!r} is not one of {', '.join(MODES)}")
        if replacement not in REPLACEMENT_RULES:
            raise ValueError(f"replacement {replacement!r} is not one of {REPLACEMENT_RULES}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise MdistillerError(f"CRD.NCE.K must be a positive int (negatives per sample), got {k!r}")
        labels = torch.as_tensor(labels).long().reshape(-1)
        if labels.numel() == 0:
            raise MdistillerError("the training set is empty: no contrastive indices to draw")
        self.k, self.mode, self.replacement = k, mode, replacement
        self.labels = labels
        self.counts = torch.bincount(labels)  # samples per class
        self.order = torch.argsort(labels, stable=True)  # sample indices grouped by class
        self.starts = torch.cumsum(self.counts, 0) - self.counts  # where each class's group begins in `order`
        self.others = labels.numel() - self.counts  # samples outside each class
        present = self.others[self.counts > 0].tolist()  # once, at build time: the branch each row will take
        if max(present) == 0:
            raise MdistillerError("CRD needs samples of at least two classes: every training sample has one label")
        if replacement == "always" or k > max(present):
            self.branch = "with"
        elif k <= min(present):
            self.branch = "without"
        else:  # class sizes straddle K: each row picks its branch on the device (both are drawn)
            self.branch = "mixed"

    @property
    def device(self) -> torch.device:
        """Where the draws happen (the labels' device)."""
        return self.labels.device

    def draw(self, index: torch.Tensor, target: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, K + 1) int64 rows for samples `index` of classes `target` (both (B,), on the sampler's device)."""
        if self.branch == "with":
            positive, negatives = self._with_replacement(target, generator)
        elif self.branch == "without":
            positive, negatives = self._without_replacement(target, generator)
        else:
            pos_w, neg_w = self._with_replacement(target, generator)
            pos_wo, neg_wo = self._without_replacement(target, generator)
            needs = (self.k > self.others[target])[:, None]
            negatives = torch.where(needs, neg_w, neg_wo)
            positive = None if pos_w is None else torch.where(needs[:, 0], pos_w, pos_wo)
        if positive is None:  # "exact"
            positive = index.to(torch.long)
        return torch.cat([positive[:, None], negatives], 1)

    def draw_one(self, index: int, target: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The (K + 1,) row of one sample (the DataLoader path's per-item draw, on the CPU)."""
        rows = self.draw(torch.tensor([index], device=self.device), torch.tensor([int(target)], device=self.device),
                         generator)
        return rows[0]

    def _without_replacement(self, target: torch.Tensor, generator: torch.Generator | None):
        keys = torch.rand(len(target), len(self.labels), generator=generator, device=self.device)
        own = self.labels[None, :] == target[:, None]
        positive = keys.masked_fill(~own, _EXCLUDED).argmin(1) if self.mode == "relax" else None
        # (rows of the "mixed" branch whose class leaves fewer than K others take the other branch's draw instead)
        negatives = keys.masked_fill(own, _EXCLUDED).topk(self.k, dim=1, largest=False, sorted=False).indices
        return positive, negatives

    def _with_replacement(self, target: torch.Tensor, generator: torch.Generator | None):
        relax = self.mode == "relax"
        wide = torch.randint(0, _WIDE, (len(target), self.k + relax), generator=generator, device=self.device)
        start, count = self.starts[target][:, None], self.counts[target][:, None]
        position = wide[:, relax:] % self.others[target][:, None]  # among the other classes' samples ...
        position = position + count * (position >= start)  # ... laid out in `order` around the class's own group
        positive = self.order[start[:, 0] + wide[:, 0] % count[:, 0]] if relax else None
        return positive, self.order[position]


def contrastive_sampler(train_set: Dataset, needs: Mapping[str, object], device=None) -> ContrastiveSampler | None:
    """The sampler of the "contrastive_index" need over `train_set`'s labels (on `device`), or None without the need.
    The data set's `contrastive_replacement` ("always" for the ImageNet folders, as upstream) sets the rule."""
    spec = needs.get("contrastive_index")
    if spec is None:
        return None
    if not hasattr(train_set, "class_labels"):
        raise MdistillerError(f"the training set ({type(train_set).__name__}) cannot serve contrastive_index")
    labels = train_set.class_labels().to(device or "cpu")
    return ContrastiveSampler(labels, spec["k"], spec.get("mode", "exact"),
                              getattr(train_set, "contrastive_replacement", "when_needed"))
