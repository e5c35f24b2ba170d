"""Detection distillation on COCO (issue 26): torchvision Faster R-CNN parts, COCO data and evaluation."""
