"""Make KD++ / DKD++'s class centres: the teacher's mean pooled feature per class over the training set.

    python tools/kdpp_centers.py --cfg configs/cifar100/kdpp/resnet32x4_resnet8x4.yaml [-c TEACHER_CKPT] [-o OUT]
        [--batch-size 64] [KEY VALUE ...]

Writes the authors' JSON layout `{"0": [D floats], "1": ..., "C-1": [...]}` (indent 4), atomically, to OUT: by
default the file the config names in KDPP.CENTERS / DKDPP.CENTERS, else
`kdpp_centers/<DATASET.TYPE>/<DISTILLER.TEACHER>/center_emb_train.json`. Train with `KDPP.CENTERS OUT`.

As the authors' `emb_fea_distribution.py`: the teacher in eval mode runs over the TRAINING set in order, with the
training augmentation (CIFAR: pad 4, random crop, flip; the data set's "standard" view), drawn from EXPERIMENT.SEED;
each value of each image's pooled feature (feats["pooled_feat"]) is rounded to 4 decimals, and each class mean is
rounded to 4 decimals. Runs on the GPU when there is one (CIFAR-100 with resnet32x4 takes about a minute on 2 CPU
cores per 10,000 images).
"""

from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

from ..distillers.kdpp import class_centres, default_centres_path, save_centres
from ..errors import MdistillerError
from . import run_cli
from .teacher_pass import teacher_pass

CENTRE_SECTIONS = ("KDPP", "DKDPP")  # the config sections whose CENTERS key names the file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser("kdpp_centers.py", description="KD++ / DKD++ class centres of a teacher")
    parser.add_argument("--cfg", type=str, default="", help="YAML config (teacher and data set); default: defaults")
    parser.add_argument("-c", "--ckpt", type=str, default="", help="teacher checkpoint (sets DISTILLER.TEACHER_CKPT)")
    parser.add_argument("-o", "--out", type=str, default="",
                        help="output file; default: the config's CENTERS, else "
                             "kdpp_centers/<dataset>/<teacher>/center_emb_train.json")
    parser.add_argument("-bs", "--batch-size", type=int, default=64)
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    return parser.parse_args(argv)


def default_output(cfg) -> str:
    """The file the config's method names in CENTERS, else the tool's default path for this teacher and data set."""
    section = cfg.DISTILLER.TYPE
    if section in CENTRE_SECTIONS and cfg[section].CENTERS:
        return cfg[section].CENTERS
    return default_centres_path(cfg.DATASET.TYPE, cfg.DISTILLER.TEACHER)


@torch.no_grad()
def teacher_embeddings(teacher: torch.nn.Module, loader, device: torch.device):
    """(pooled features on the CPU, labels) of each batch, the teacher in eval mode."""
    for batch in tqdm(loader, desc="teacher features", dynamic_ncols=True):
        _, feats = teacher(batch["image"].to(device, non_blocking=True))
        yield feats["pooled_feat"].float().cpu(), batch["target"]


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if args.batch_size <= 0:
        raise MdistillerError(f"--batch-size must be positive, got {args.batch_size}")
    run = teacher_pass(args, default_output, "standard")  # the training augmentation, as the authors
    cfg, out, num_classes, train_set = run.cfg, run.out, run.num_classes, run.train_set
    centres = class_centres(teacher_embeddings(run.teacher, run.loader, run.device), num_classes)
    save_centres(out, centres)
    print(f"wrote {out}: {num_classes} class centres of {centres.shape[1]} ({cfg.DISTILLER.TEACHER}'s pooled feature "
          f"over {len(train_set)} training images, training augmentation). Train with KDPP.CENTERS {out} "
          f"(DKDPP.CENTERS for DKD++)")
    return out


def entry_point() -> None:
    """The console script: main() with one-line errors."""
    run_cli(main)


if __name__ == "__main__":
    entry_point()
