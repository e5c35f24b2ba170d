"""One training run from a frozen config: name it, seed it, build it, train it, record the result."""

from __future__ import annotations

import hashlib
import os
import sys
from typing import Sequence

import torch

from ..dataset import get_dataset
from ..distillers import get_distiller_class
from .build import build_distiller
from .cfg import cfg_text, dump_cfg
from .errors import MdistillerError
from .trainer import Trainer
from .utils import set_seed

# Overrides that change where or how verbosely a run works, not what it computes: kept out of the run name.
_KEYS_NOT_IN_NAME = ("DATASET.ROOT", "DATASET.NUM_WORKERS", "DATASET.DOWNLOAD", "LOG.", "DISTILLER.TEACHER_CKPT")


def _fmt(value: float) -> str:
    return f"{value:g}"


def run_name(cfg, opts: Sequence[str] = ()) -> str:
    """EXPERIMENT.NAME (or TAG), the `KEY:VALUE` overrides, and the LS setting, so LS runs never share a folder."""
    name = cfg.EXPERIMENT.NAME or cfg.EXPERIMENT.TAG
    final_values = dict(zip(opts[::2], opts[1::2]))  # a key given twice counts once, with its last value
    tags = [
        f"{key}:{value}"
        for key, value in final_values.items()
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in _KEYS_NOT_IN_NAME)
    ]
    if cfg.EXPERIMENT.LOGIT_STAND:
        tags.append(ls_tag(cfg))
    if tags:
        name += "," + ",".join(tags)
    return name.replace(os.sep, "_")


def ls_tag(cfg) -> str:
    """`LS:T<τ>,w<w>` from the flags' values (just `LS` when LOGIT_STAND was switched on in the YAML itself)."""
    if cfg.EXPERIMENT.BASE_TEMP > 0:
        return f"LS:T{_fmt(cfg.EXPERIMENT.BASE_TEMP)},w{_fmt(cfg.EXPERIMENT.KD_WEIGHT)}"
    return "LS"


def result_log_name(cfg) -> str:
    """`<TYPE>,<TEACHER>,<STUDENT>[,<base_temp>,<kd_weight>].txt`, the logit-standardisation repo's naming."""
    teacher = cfg.DISTILLER.TEACHER if get_distiller_class(cfg.DISTILLER.TYPE).requires_teacher else "none"
    parts = [cfg.DISTILLER.TYPE, teacher, cfg.DISTILLER.STUDENT]
    if cfg.EXPERIMENT.LOGIT_STAND and cfg.EXPERIMENT.BASE_TEMP > 0:
        parts += [_fmt(cfg.EXPERIMENT.BASE_TEMP), _fmt(cfg.EXPERIMENT.KD_WEIGHT)]
    elif cfg.EXPERIMENT.LOGIT_STAND:
        parts.append("LS")
    return ",".join(parts) + ".txt"


def config_hash(cfg) -> str:
    """A short hash of the recipe: the merged config less the seed and the where-to-work keys, so the seeds of one
    recipe share it."""
    recipe = cfg.clone()
    recipe.defrost()
    recipe.EXPERIMENT.SEED = 0
    recipe.DATASET.ROOT = recipe.DATASET.NUM_WORKERS = recipe.LOG.PREFIX = recipe.LOG.RESULTS_DIR = None
    recipe.DISTILLER.TEACHER_CKPT = ""
    return hashlib.sha1(cfg_text(recipe).encode()).hexdigest()[:10]


def append_result(cfg, run_dir: str, result: dict[str, float]) -> str:
    """Append one line for a finished run to LOG.RESULTS_DIR/<result_log_name>; returns the file's path."""
    os.makedirs(cfg.LOG.RESULTS_DIR, exist_ok=True)
    path = os.path.join(cfg.LOG.RESULTS_DIR, result_log_name(cfg))
    line = (
        f"best_top1={result['best_acc']:.4f}\tlast_top1={result['last_acc']:.4f}\tseed={cfg.EXPERIMENT.SEED}\t"
        f"epochs={cfg.SOLVER.EPOCHS}\tconfig_hash={config_hash(cfg)}\trun_dir={os.path.abspath(run_dir)}"
    )
    with open(path, "a") as f:
        f.write(line + "\n")
    return path


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_run(cfg, opts: Sequence[str] = (), resume: bool = False) -> dict:
    """Train the run that cfg (frozen, validated) describes; returns best/last top-1 and the run directory."""
    name = run_name(cfg, opts)
    run_dir = os.path.join(cfg.LOG.PREFIX, cfg.EXPERIMENT.PROJECT, name)
    if not resume and os.path.exists(os.path.join(run_dir, "latest")):
        raise MdistillerError(
            f"{run_dir} already holds a run: pass --resume to continue it, or set EXPERIMENT.NAME for a new one"
        )
    os.makedirs(run_dir, exist_ok=True)
    device = default_device()
    set_seed(cfg.EXPERIMENT.SEED)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    distiller_class = get_distiller_class(cfg.DISTILLER.TYPE)
    train_loader, val_loader, num_train, num_classes = get_dataset(
        cfg, distiller_class.train_views, seed=cfg.EXPERIMENT.SEED
    )
    distiller = build_distiller(cfg, num_classes)
    dump_cfg(cfg, os.path.join(run_dir, "config.yaml"))
    trainer = Trainer(run_dir, distiller, train_loader, val_loader, cfg, device)
    trainer.log(
        f"run {run_dir}: {cfg.DISTILLER.TYPE} {cfg.DISTILLER.STUDENT}"
        + (f" <- {cfg.DISTILLER.TEACHER}" if distiller_class.requires_teacher else "")
        + f", {num_train} training images, {num_classes} classes, seed {cfg.EXPERIMENT.SEED}, device {device}, "
        f"extra parameters {distiller.get_extra_parameters()}"
    )
    result = trainer.train(resume=resume)
    result_file = append_result(cfg, run_dir, result)
    trainer.log(f"best top-1 {result['best_acc']:.2f}, last {result['last_acc']:.2f}; result appended to {result_file}")
    if not distiller_class.requires_teacher:
        weights = os.path.join(run_dir, "student_best")
        zoo = f"download_ckpts/cifar_teachers/{cfg.DISTILLER.STUDENT}_vanilla/ckpt_epoch_240.pth"
        trainer.log(
            f"teacher weights: {weights}. To distil from it, pass DISTILLER.TEACHER_CKPT {weights} "
            f"or copy it to {zoo}"
        )
    sys.stdout.flush()
    return {**result, "run_dir": run_dir}
