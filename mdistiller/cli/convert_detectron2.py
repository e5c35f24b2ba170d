"""Convert a detectron2 model-zoo Faster R-CNN checkpoint into a torchvision FasterRCNN checkpoint.

    python tools/convert_detectron2.py MODEL.pkl -o OUT.pth [--drop-mask-head] [--rgb] [--prefix teacher.]

Reads a model-zoo pickle with a numpy-only unpickler (a `torch.save`d file with weights_only; `--prefix teacher.`
keeps only the teacher of a file that bundles teacher and student, prefix removed), maps every name to
torchvision's `FasterRCNN(resnet_fpn_backbone(..., FrozenBatchNorm2d))`, moves the background class first, loads the
result strictly into a torchvision R-18/34/50/101/152-FPN, and writes `{"model": state_dict, "arch": ...,
"input": {...}}` atomically to OUT. The checkpoint takes detectron2's input (BGR, 0-255, minus PIXEL_MEAN, std 1);
`--rgb` reverses the stem's input channels so it takes RGB with the mean in RGB order. `--drop-mask-head` drops a
Mask R-CNN's mask head (the distillation teacher runs without masks). See mdistiller/detection/detectron2_weights.py.
"""

from __future__ import annotations

import argparse

from ..detection.detectron2_weights import (
    DETECTRON2_PIXEL_MEAN_BGR,
    DETECTRON2_PIXEL_STD,
    load_detectron2_faster_rcnn,
)
from ..engine.checkpoint import save_checkpoint
from . import run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser("convert_detectron2.py",
                                     description="detectron2 model-zoo Faster R-CNN -> torchvision FasterRCNN")
    parser.add_argument("src", help="detectron2 checkpoint (.pkl from the model zoo, or .pth with 'model')")
    parser.add_argument("-o", "--out", required=True, help="output checkpoint ({'model': state_dict})")
    parser.add_argument("--drop-mask-head", action="store_true", help="drop a Mask R-CNN's roi_heads.mask_head.*")
    parser.add_argument("--prefix", default="",
                        help="only the weights named PREFIX* (e.g. teacher. in a file bundling teacher and student)")
    parser.add_argument("--rgb", action="store_true", help="reverse the stem's input channels: the model takes RGB")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    _, state_dict, depth = load_detectron2_faster_rcnn(args.src, args.drop_mask_head, args.rgb,
                                                       prefix=args.prefix)
    mean = DETECTRON2_PIXEL_MEAN_BGR[::-1] if args.rgb else DETECTRON2_PIXEL_MEAN_BGR
    num_classes = int(state_dict["roi_heads.box_predictor.cls_score.weight"].shape[0])
    save_checkpoint({
        "model": state_dict,
        "arch": f"fasterrcnn_resnet{depth}_fpn_detectron2",
        "num_classes": num_classes,  # background (label 0) included
        "input": {"format": "RGB" if args.rgb else "BGR", "scale": 255, "pixel_mean": list(mean),
                  "pixel_std": list(DETECTRON2_PIXEL_STD), "stride_in_1x1": True},
        "source": args.src,
    }, args.out)
    print(f"wrote {args.out}: R-{depth}-FPN, {len(state_dict)} tensors, {num_classes} classes (background first)")
    return args.out


def entry_point() -> None:
    """The console script: main() with one-line errors."""
    run_cli(main)


if __name__ == "__main__":
    entry_point()
