"""Make WKD-L's class cost matrix: 1 - linear CKA between the teacher's per-class features on the training set.

    python tools/wkd_cost_matrix.py --cfg configs/cifar100/wkd_l/resnet32x4_resnet8x4.yaml
        [-c TEACHER_CKPT] [-o OUT] [--feature feats|pooled|logits] [--max-per-class N] [--batch-size 256]
        [KEY VALUE ...]

Writes a C x C float tensor (`torch.save`, symmetric, zero diagonal) to OUT, by default
`wkd_cost_matrix/<DATASET.TYPE>/<DISTILLER.TEACHER>/linear_cka.pth`, the path the WKD configs name in
WKD.COST_MATRIX_PATH. Train with `WKD.COST_MATRIX cka WKD.COST_MATRIX_PATH OUT`.

As the WKD authors' tool: the teacher (eval mode) runs over the training set in order with the test transform (no
augmentation). `--feature feats` (default, the authors' CIFAR setting) takes the last feature map
feats["feats"][-1] and counts every spatial position of every image as one row of its class's matrix; `pooled`
takes feats["pooled_feat"] and `logits` the logits (the authors' ImageNet setting), one row per image. Each class
keeps its first n images, n = the smallest class count (`--max-per-class` caps it), rows of different classes are
paired by position, and the cost is `1 - ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)` on centred rows. A class absent
from the training set gets cost 1 to every other class (with a warning). Runs on the GPU when there is one; on 2 CPU
cores resnet32x4's matrix (32,000 rows of 256 per class) takes a few minutes.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from tqdm import tqdm

from ..distillers.ot import linear_cka_distance
from ..engine.checkpoint import save_checkpoint
from ..errors import MdistillerError
from . import run_cli
from .teacher_pass import teacher_pass

FEATURES = {
    "feats": lambda logits, feats: feats["feats"][-1].flatten(2).transpose(1, 2),  # B x HW x C
    "pooled": lambda logits, feats: feats["pooled_feat"].unsqueeze(1),  # B x 1 x D
    "logits": lambda logits, feats: logits.unsqueeze(1),  # B x 1 x classes
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser("wkd_cost_matrix.py", description="WKD-L cost matrix: 1 - linear CKA")
    parser.add_argument("--cfg", type=str, default="", help="YAML config (teacher and data set); default: defaults")
    parser.add_argument("-c", "--ckpt", type=str, default="", help="teacher checkpoint (sets DISTILLER.TEACHER_CKPT)")
    parser.add_argument("-o", "--out", type=str, default="",
                        help="output file; default wkd_cost_matrix/<dataset>/<teacher>/linear_cka.pth")
    parser.add_argument("--feature", choices=sorted(FEATURES), default="feats", help="which teacher output")
    parser.add_argument("--max-per-class", type=int, default=0, help="use at most N images per class (0: all)")
    parser.add_argument("-bs", "--batch-size", type=int, default=256)
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    return parser.parse_args(argv)


def default_output(cfg) -> str:
    """Where the WKD configs look for the matrix of this teacher and data set."""
    return os.path.join("wkd_cost_matrix", cfg.DATASET.TYPE, cfg.DISTILLER.TEACHER, "linear_cka.pth")


@torch.no_grad()
def class_features(teacher: torch.nn.Module, loader, num_classes: int, feature: str, max_per_class: int,
                   device: torch.device) -> tuple[torch.Tensor, list[int], int]:
    """(P x n x d features of the P classes present, their class ids, images per class used)."""
    extract = FEATURES[feature]
    rows: list[list[torch.Tensor]] = [[] for _ in range(num_classes)]
    for batch in tqdm(loader, desc="teacher features", dynamic_ncols=True):
        logits, feats = teacher(batch["image"].to(device, non_blocking=True))
        out = extract(logits, feats).float().cpu()
        for sample, label in zip(out, batch["target"].tolist()):
            if not max_per_class or len(rows[label]) < max_per_class:
                rows[label].append(sample)
    present = [c for c in range(num_classes) if rows[c]]
    if not present:
        raise MdistillerError("the training set is empty: no class features to compare")
    missing = num_classes - len(present)
    if missing:
        print(f"warning: {missing} of {num_classes} classes have no training image: their cost to every other "
              f"class is set to 1", file=sys.stderr)
    per_class = min(len(rows[c]) for c in present)
    sample_rows, dim = rows[present[0]][0].shape
    stacked = torch.empty(len(present), per_class * sample_rows, dim)
    for i, c in enumerate(present):
        stacked[i] = torch.cat(rows[c][:per_class])
        rows[c] = []  # free as we go: the features of a large teacher take gigabytes
    return stacked, present, per_class


def cost_matrix(class_feats: torch.Tensor, present: list[int], num_classes: int, device: torch.device) -> torch.Tensor:
    """C x C: 1 - linear CKA among the classes present, 1 to and from absent ones, 0 on the diagonal."""
    distance = linear_cka_distance(class_feats.to(device), progress=True).cpu()
    full = torch.ones(num_classes, num_classes)
    index = torch.tensor(present)
    full[index.unsqueeze(1), index.unsqueeze(0)] = distance
    full.fill_diagonal_(0.0)
    return full


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if args.batch_size <= 0 or args.max_per_class < 0:
        raise MdistillerError("--batch-size must be positive and --max-per-class non-negative")
    # the training images without augmentation (every data set's "test" view)
    run = teacher_pass(args, default_output, "test")
    cfg, out, num_classes, device = run.cfg, run.out, run.num_classes, run.device
    feats, present, per_class = class_features(run.teacher, run.loader, num_classes, args.feature,
                                               args.max_per_class, device)
    cost = cost_matrix(feats, present, num_classes, device)
    save_checkpoint(cost, out)
    print(
        f"wrote {out}: {num_classes} x {num_classes} cost (1 - linear CKA of {cfg.DISTILLER.TEACHER}'s "
        f"{args.feature} features, {per_class} images per class, {feats.shape[1]} rows of {feats.shape[2]}). "
        f"Train with WKD.COST_MATRIX cka WKD.COST_MATRIX_PATH {out}"
    )
    return out


def entry_point() -> None:
    """The console script: main() with one-line errors."""
    run_cli(main)


if __name__ == "__main__":
    entry_point()
