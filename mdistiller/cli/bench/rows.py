"""The bench's row table: what each row switches (overrides on the base config), which rows a family and device
time by default, and each row's frozen config."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch

from ...dataset.cifar import CIFAR_FORMATS
from ...engine.build import is_imagenet
from ...engine.cfg import load_cfg
from ...engine.validate import check_recipe
from ...errors import MdistillerError

DEFAULT_PAIR = "resnet32x4_resnet8x4"
DEFAULT_CFG = f"configs/cifar100/kd/{DEFAULT_PAIR}.yaml"
DEFAULT_LARGE_CFG = "configs/cifar100/kd/fast/resnet32x4_resnet8x4.yaml"
# What the large-batch config holds, for a checkout that lacks the file
LARGE_BATCH_OPTS = ("SOLVER.BATCH_SIZE", "512", "SOLVER.LR", "0.4", "SOLVER.LR_WARMUP_EPOCHS", "5",
                    "SOLVER.AMP", "True", "SOLVER.CHANNELS_LAST", "True", "SOLVER.COMPILE", "default")
TINY_CIFAR_OPTS = ("DISTILLER.TEACHER", "resnet20", "DISTILLER.STUDENT", "resnet8")
TINY_IMAGENET_OPTS = ("DATASET.IMAGE_SIZE", "32", "SOLVER.BATCH_SIZE", "4")
def _switches(amp: bool = False, channels_last: bool = False, compile_mode: str = "") -> tuple[str, ...]:
    return ("SOLVER.AMP", str(amp), "SOLVER.CHANNELS_LAST", str(channels_last), "SOLVER.COMPILE", compile_mode)


@dataclass(frozen=True)
class Row:
    """One configuration to time: overrides on the base config, and whether the host reads the loss every step."""

    name: str
    what: str
    opts: tuple[str, ...] = ()
    sync_every_step: bool = False
    large_batch: bool = False  # built from the large-batch config instead of --cfg
    loader_only: bool = False  # times the ImageNet training loader alone, no training step


_RESIDENT = ("DATASET.DEVICE_RESIDENT", "True")
_CACHE = ("DISTILLER.TEACHER_CACHE", "auto")  # the rows build their own table (see cache_table)
ROWS = {row.name: row for row in (
    Row("reference", "mdistiller's step: fp32, loss.item() every step (its meters' host sync)",
        ("DATASET.DEVICE_RESIDENT", "False", "DATASET.NUM_WORKERS", "2", *_switches()), sync_every_step=True),
    Row("ours", "our default: fp32, no host sync per step", (*_RESIDENT, *_switches())),
    Row("amp", "ours + SOLVER.AMP (bf16 autocast)", (*_RESIDENT, *_switches(amp=True))),
    Row("channels_last", "ours + SOLVER.CHANNELS_LAST", (*_RESIDENT, *_switches(channels_last=True))),
    Row("amp_channels_last", "ours + AMP + channels_last", (*_RESIDENT, *_switches(True, True))),
    Row("compile", "ours + SOLVER.COMPILE default", (*_RESIDENT, *_switches(compile_mode="default"))),
    Row("cuda_graphs", "ours + SOLVER.COMPILE reduce-overhead (CUDA graphs on CUDA)",
        (*_RESIDENT, *_switches(compile_mode="reduce-overhead"))),
    Row("combined", "ours + AMP + channels_last + compile default", (*_RESIDENT, *_switches(True, True, "default"))),
    Row("large_batch", "the large-batch config (batch 512, LR 0.4 with warm-up, AMP, channels_last, compile)",
        large_batch=True),
    Row("teacher_cache", "ours + DISTILLER.TEACHER_CACHE (teacher logits looked up, the teacher not run)",
        (*_RESIDENT, *_switches(), *_CACHE)),
    Row("teacher_cache_combined", "ours + AMP + channels_last + compile default + DISTILLER.TEACHER_CACHE",
        (*_RESIDENT, *_switches(True, True, "default"), *_CACHE)),
    Row("loader_pil", "loader alone: JPEGs decoded, cropped and flipped by PIL in the DataLoader workers",
        ("DATASET.GPU_DECODE", "False"), loader_only=True),
    Row("loader_gpu_decode", "loader alone: DATASET.GPU_DECODE (workers read bytes; batched decode_jpeg, crop, resize, "
        "flip on the device)", ("DATASET.GPU_DECODE", "True"), loader_only=True),
)}
LOADER_ROWS = tuple(name for name, row in ROWS.items() if row.loader_only)
DEFAULT_ROWS = {
    ("cifar", "cuda"): ("reference", "ours", "amp", "channels_last", "compile", "cuda_graphs", "combined",
                        "large_batch", "teacher_cache", "teacher_cache_combined"),
    ("cifar", "cpu"): ("reference", "ours", "amp", "channels_last", "teacher_cache"),
    ("imagenet", "cuda"): ("reference", "ours", "amp", "amp_channels_last", *LOADER_ROWS),
    ("imagenet", "cpu"): ("reference", "ours", "amp", "amp_channels_last"),
}


def load(path: str, opts: list[str]):
    """The frozen, checked config of a file and overrides."""
    cfg = load_cfg(path, opts)
    check_recipe(cfg)
    cfg.freeze()
    return cfg


def family_of(cfg) -> str:
    """"imagenet" (synthetic device tensors) or "cifar" (the real loaders)."""
    if is_imagenet(cfg.DATASET.TYPE):
        return "imagenet"
    if cfg.DATASET.TYPE not in CIFAR_FORMATS:
        raise MdistillerError(f"bench.py times CIFAR or ImageNet configs; DATASET.TYPE is {cfg.DATASET.TYPE!r}")
    return "cifar"


def select_rows(text: str, family: str, device: torch.device) -> list[Row]:
    """The rows named in --rows (default: the table of this family and device); unknown names are an error."""
    names = [n.strip() for n in text.split(",") if n.strip()] or list(DEFAULT_ROWS[(family, device.type)])
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise MdistillerError(f"unknown row {unknown[0]!r}; rows: {', '.join(ROWS)}")
    if family != "imagenet" and any(ROWS[n].loader_only for n in names):
        raise MdistillerError(f"rows {', '.join(LOADER_ROWS)} time the ImageNet JPEG pipeline: give an ImageNet --cfg")
    if family == "imagenet" and "large_batch" in names:
        raise MdistillerError("row large_batch is the CIFAR large-batch config; an ImageNet bench sets its batch "
                              "with --opts SOLVER.BATCH_SIZE")
    if len(set(names)) != len(names):
        raise MdistillerError(f"--rows names a row twice: {','.join(names)}")
    return [ROWS[n] for n in names]


def large_batch_file(args: argparse.Namespace) -> str | None:
    """The large_batch row's config file; None when the default one is missing (then --cfg + LARGE_BATCH_OPTS)."""
    if args.large_cfg is not None:
        return args.large_cfg  # a missing --large-cfg is an error, reported by load_cfg
    return DEFAULT_LARGE_CFG if os.path.isfile(DEFAULT_LARGE_CFG) else None


def large_batch_source(args: argparse.Namespace) -> str:
    """Where the large_batch row's config comes from, for the legend."""
    path = large_batch_file(args)
    return path or f"{args.cfg} + {' '.join(LARGE_BATCH_OPTS)} ({DEFAULT_LARGE_CFG} is missing)"


def row_cfg(args: argparse.Namespace, row: Row, base_opts: list[str]):
    """The frozen config of one row: its config file, the bench's and the user's overrides, the row's switches."""
    if not row.large_batch:
        return load(args.cfg, [*base_opts, *row.opts])
    path = large_batch_file(args)
    return load(path, base_opts) if path else load(args.cfg, [*LARGE_BATCH_OPTS, *base_opts])
