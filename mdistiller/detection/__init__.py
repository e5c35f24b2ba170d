"""Detection distillation on COCO (issue 26): torchvision Faster R-CNN parts, COCO data and evaluation."""

from . import methods  # noqa: F401  (registers the RCNN_* distillers and their config sections)
