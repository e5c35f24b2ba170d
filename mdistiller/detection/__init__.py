"""Detection distillation on COCO (issue 26): torchvision Faster R-CNN parts, COCO data and evaluation.

Importing this package registers DATASET.TYPE "coco" (data.py) and the RCNN_* distillers with their config sections
(methods.py); mdistiller.engine imports it before assembling CFG."""

from . import data  # noqa: F401  (registers the "coco" data set)
from . import methods  # noqa: F401  (registers the RCNN_* distillers and their config sections)
