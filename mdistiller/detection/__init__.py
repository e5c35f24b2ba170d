"""Object detection (COCO Faster R-CNN FPN) distillation: detectors, data, evaluation, distillers (issue 26)."""
