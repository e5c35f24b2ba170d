"""Train a teacher (DISTILLER.TYPE NONE) or distil a student, as a config describes.

    python tools/train.py --cfg configs/cifar100/kd/resnet32x4_resnet8x4.yaml [--resume]
        [--logit-stand [--base-temp 2] [--kd-weight 9]] [KEY VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a plain checkout too

from mdistiller.engine.build import apply_logit_stand_flags  # noqa: E402
from mdistiller.engine.cfg import load_cfg, validate_cfg  # noqa: E402
from mdistiller.engine.cli import run_cli  # noqa: E402
from mdistiller.engine.run import train_run  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser("train.py", description="training for knowledge distillation")
    parser.add_argument("--cfg", type=str, default="", help="YAML config file")
    parser.add_argument("--resume", action="store_true", help="continue the run from its `latest` checkpoint")
    parser.add_argument("--logit-stand", action="store_true", help="logit standardisation (z-score) on the logits")
    parser.add_argument("--base-temp", type=float, default=2.0, help="temperature with --logit-stand")
    parser.add_argument("--kd-weight", type=float, default=9.0, help="distillation weight with --logit-stand")
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    return parser.parse_args(argv)


def build_cfg(args: argparse.Namespace):
    """Defaults <- --cfg <- KEY VALUE overrides <- LS flags; validated and frozen."""
    cfg = load_cfg(args.cfg, args.opts or [])
    if args.logit_stand:
        apply_logit_stand_flags(cfg, args.base_temp, args.kd_weight)
    validate_cfg(cfg)
    cfg.freeze()
    return cfg


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = build_cfg(args)
    return train_run(cfg, args.opts or [], resume=args.resume)


if __name__ == "__main__":
    run_cli(main)
