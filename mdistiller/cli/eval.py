"""Evaluate a checkpoint on a test set: top-1 and top-5.

    python tools/eval.py -m resnet8x4 -c output/.../student_best [-d cifar100] [-bs 64]
    python tools/eval.py -m resnet32x4 -c pretrain          # the zoo's published teacher
    python tools/eval.py -m ResNet34 -c pretrain -d imagenet  # download_ckpts/imagenet_teachers/ (torchvision's)
    python tools/eval.py -m MobileNetV2 -c output/.../student_best -d tiny_imagenet  # the Tiny-ImageNet zoo
    python tools/eval.py -m R18-FPN -c output/coco/.../student_best -d coco --data-root data/coco  # COCO box AP
    python tools/eval.py -m R101-FPN -c download_ckpts/detectron2/model_final_f6e8b1.pkl -d coco  # a zoo teacher
"""

from __future__ import annotations

import argparse

from ..dataset import eval_loader, get_test_set, num_classes_of
from ..detection.data import build_coco_test_set
from ..detection.data import eval_loader as detection_eval_loader
from ..detection.inference import evaluate_detection
from ..detection.models import load_detector
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
                        help="cifar100 | cifar10 | imagenet | tiny_imagenet | coco")
    parser.add_argument("--image-size", type=int, default=224, help="ImageNet: the center crop (DATASET.IMAGE_SIZE)")
    parser.add_argument("-bs", "--batch-size", type=int, default=64)
    parser.add_argument("--data-root", type=str, default=None, help="default: $MDISTILLER_DATA or ./data")
    parser.add_argument("--num-workers", type=int, default=2)
    detection = parser.add_argument_group("-d coco (detectors: students R18-FPN / R50-FPN / MV2-FPN, teachers "
                                          "R101-FPN / R50-FPN)")
    detection.add_argument("--split", default=None, help="the COCO split (DETECTION.TEST_SPLIT; default val2017)")
    detection.add_argument("--min-size", type=int, default=None, help="test shortest edge (default 800)")
    detection.add_argument("--max-size", type=int, default=None, help="test longest-edge limit (default 1333)")
    detection.add_argument("--results-json", default=None, help="write the COCO detections (results format) here")
    return parser.parse_args(argv)


DETECTION_ONLY = ("split", "min_size", "max_size", "results_json")


def evaluate_detector(args: argparse.Namespace) -> dict:
    """COCO box AP of a detector file: a run's student (`student_best`), a teacher (.pkl, bundled .pth, converted)."""
    cfg = data_cfg("coco", args.data_root)
    cfg.DATASET.NUM_WORKERS = args.num_workers
    for key, value in (("TEST_SPLIT", args.split), ("MIN_SIZE_TEST", args.min_size), ("MAX_SIZE_TEST", args.max_size)):
        if value is not None:
            cfg.DETECTION[key] = value
    if args.ckpt == "pretrain":
        raise MdistillerError("-c pretrain: there is no published detector zoo here; pass a checkpoint file (a run's "
                              "student_best, or a detectron2 model-zoo .pkl for a teacher)")
    model = load_detector(args.model, args.ckpt)
    loader = detection_eval_loader(build_coco_test_set(cfg), args.batch_size, args.num_workers)
    device = default_device()
    result = evaluate_detection(model.to(device), loader, device, results_json=args.results_json)
    print(f"{args.model} {args.ckpt} on coco {cfg.DETECTION.TEST_SPLIT}: box AP {result['AP']:.2f}  "
          f"AP50 {result['AP50']:.2f}  AP75 {result['AP75']:.2f}  APs {result['APs']:.2f}  APm {result['APm']:.2f}  "
          f"APl {result['APl']:.2f}" + (f"; detections written to {args.results_json}" if args.results_json else ""))
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.batch_size <= 0:
        raise MdistillerError(f"--batch-size must be positive, got {args.batch_size}")
    if args.dataset == "coco":
        return evaluate_detector(args)
    given = [f"--{name.replace('_', '-')}" for name in DETECTION_ONLY if getattr(args, name) is not None]
    if given:
        raise MdistillerError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to -d coco only")
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
