"""The tests' CIFAR writers: one piece of code with tools/bench.py, in mdistiller.dataset.cifar_files."""

from mdistiller.dataset.cifar_files import learnable_images, write_cifar10, write_cifar100  # noqa: F401
