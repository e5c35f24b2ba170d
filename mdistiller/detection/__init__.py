"""Detection distillation on COCO (issue 26): torchvision Faster R-CNN parts, COCO data and evaluation.

Importing this package registers DATASET.TYPE "coco" (data.py)."""

from . import data  # noqa: F401  (registers the "coco" data set)
