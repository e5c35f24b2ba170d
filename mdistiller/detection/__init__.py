"""Detection distillation on COCO (issue 26): torchvision Faster R-CNN parts, COCO data and evaluation.

Importing this package registers DATASET.TYPE "coco" (data.py) and the RCNN_* distillers with their config sections
(methods.py); mdistiller.engine imports it before assembling CFG."""

from . import data, methods  # noqa: F401  (registered on import)
