"""What the tools that run a teacher over the training set share (tools/wkd_cost_matrix.py, tools/kdpp_centers.py):
the config from `--cfg` / `KEY VALUE` / `-c`, the output path, the teacher in eval mode on the device, the training
set in one view and its loader in order."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..dataset import DATASETS, DataRequest, num_classes_of
from ..engine.build import build_teacher
from ..engine.cfg import default_cfg, load_cfg, merge_opts
from ..engine.run import default_device
from ..rng import set_seed


@dataclass
class TeacherPass:
    """The teacher, the training set and where the tool writes."""

    cfg: object
    out: str
    num_classes: int
    device: torch.device
    teacher: nn.Module
    train_set: Dataset
    loader: DataLoader


def teacher_pass(args: argparse.Namespace, default_output: Callable[[object], str], view: str) -> TeacherPass:
    """From the tool's `--cfg`, `KEY VALUE` overrides, `-c` checkpoint, `-o` output and `--batch-size`: the teacher
    (eval mode) and the training set in `view`, loaded in order, its random draws seeded by EXPERIMENT.SEED."""
    if args.cfg:
        cfg = load_cfg(args.cfg, args.opts or [])
    else:
        cfg = default_cfg()
        merge_opts(cfg, args.opts or [])
    if args.ckpt:
        cfg.DISTILLER.TEACHER_CKPT = args.ckpt
    out = args.out or default_output(cfg)
    num_classes = num_classes_of(cfg)
    device = default_device()
    teacher = build_teacher(cfg, num_classes).to(device).eval()
    set_seed(cfg.EXPERIMENT.SEED)
    train_set, _, _ = DATASETS.get(cfg.DATASET.TYPE).build(cfg, DataRequest({"image": view}))
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=False, num_workers=cfg.DATASET.NUM_WORKERS,
                        pin_memory=device.type == "cuda")
    return TeacherPass(cfg, out, num_classes, device, teacher, train_set, loader)
