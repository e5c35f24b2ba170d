"""mdistiller: config-driven knowledge distillation for image classifiers."""

__version__ = "0.1.0"
