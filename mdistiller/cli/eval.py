"""Evaluate a checkpoint on a test set: top-1 and top-5.

    python tools/eval.py -m resnet8x4 -c output/.../student_best [-d cifar100] [-bs 64]
    python tools/eval.py -m resnet32x4 -c pretrain          # the zoo's published teacher
    python tools/eval.py -m ResNet34 -c pretrain -d imagenet  # download_ckpts/imagenet_teachers/ (torchvision's)
    python tools/eval.py -m MobileNetV2 -c output/.../student_best -d tiny_imagenet  # the Tiny-ImageNet zoo
"""

from __future__ import annotations

import argparse

from ..dataset import eval_loader, get_test_set, num_classes_of
from ..engine.build import load_zoo_model, zoo_name
from ..engine.cfg import data_cfg
from ..engine.evaluate import evaluate
from ..engine.run import default_device
from ..errors import MdistillerError
from . import run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser("eval.py", description="evaluate a model checkpoint")
    parser.add_argument("-m", "--model", type=str, required=True, help="zoo model name, e.g. resnet8x4")
    parser.add_argument("-c", "--ckpt", type=str, default="pretrain", help="checkpoint file, or 'pretrain'")
    parser.add_argument("-d", "--dataset", type=str, default="cifar100",
                        help="cifar100 | cifar10 | imagenet | tiny_imagenet")
    parser.add_argument("--image-size", type=int, default=224, help="ImageNet: the center crop (DATASET.IMAGE_SIZE)")
    parser.add_argument("-bs", "--batch-size", type=int, default=64)
    parser.add_argument("--data-root", type=str, default=None, help="default: $MDISTILLER_DATA or ./data")
    parser.add_argument("--num-workers", type=int, default=2)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.batch_size <= 0:
        raise MdistillerError(f"--batch-size must be positive, got {args.batch_size}")
    cfg = data_cfg(args.dataset, args.data_root, args.image_size)
    num_classes = num_classes_of(cfg)
    # an alias (SDD's `<name>_sdd`) reads as its zoo model, whose published weights `-c pretrain` then means
    model, ckpt = load_zoo_model(zoo_name(args.model, args.dataset), args.ckpt, num_classes, args.dataset,
                                 args.image_size)
    loader = eval_loader(get_test_set(cfg), args.batch_size, args.num_workers)
    device = default_device()
    result = evaluate(model.to(device), loader, device)
    print(f"{args.model} {ckpt} on {args.dataset}: top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  "
          f"loss {result['loss']:.4f}")
    return result


def entry_point() -> None:
    """The console script: main() with one-line errors."""
    run_cli(main)


if __name__ == "__main__":
    entry_point()
