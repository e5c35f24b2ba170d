"""Object detection (COCO Faster/Mask R-CNN distillation on torchvision): see /work/shared/spec/detection.md."""
