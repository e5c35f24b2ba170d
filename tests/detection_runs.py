"""What the detection run tests share: the overrides that shrink a configs/coco recipe to tiny images and a
few iterations (`tiny`); the fixtures `coco` (the folder and weights) and `drop_run_files` live in conftest.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from mdistiller.distillers import get_distiller_class
from mdistiller.engine.cfg import load_cfg

from conftest import REPO, THREADS

COCO_CONFIGS = REPO / "configs" / "coco"


def tiny(tmp: Path, coco: dict, teacher: str | None, max_iter: int = 4, period: int = 2, student: str = "",
         **extra: str) -> list[str]:
    """Overrides that shrink a configs/coco recipe to tiny images and a few iterations, files inside tmp; the student
    backbone from a bundle (R18 / R50-FPN) or random (MV2-FPN, or no `student`)."""
    values = {"DETECTION.STUDENT_WEIGHTS": coco.get(f"student {student}", ""),
        "DATASET.ROOT": coco["root"], "DATASET.NUM_WORKERS": "0", "DETECTION.TRAIN_SPLIT": "train",
        "DETECTION.TEST_SPLIT": "val", "DETECTION.MIN_SIZE_TRAIN": "(32, 48)",
        "DETECTION.MAX_SIZE_TRAIN": "128",
        "DETECTION.MIN_SIZE_TEST": "32", "DETECTION.MAX_SIZE_TEST": "128", "SOLVER.MAX_ITER": str(max_iter),
        "SOLVER.CHECKPOINT_PERIOD": str(period), "SOLVER.LR_DECAY_ITERS": f"[{max_iter - 1}]" if max_iter > 1 else "[]",
        "SOLVER.WARMUP_ITERS": "1", "SOLVER.BATCH_SIZE": "2", "LOG.PREFIX": str(tmp / "output"),
        "LOG.RESULTS_DIR": str(tmp / "logs"),
        "LOG.SAVE_CHECKPOINT_FREQ": "1000",  # a detector checkpoint is ~230 MB: no numbered ones unless asked
        **extra,
    }
    if teacher is not None:
        values["DISTILLER.TEACHER_CKPT"] = coco[teacher]
    return [item for pair in values.items() for item in pair]


def run_dir_of(tmp: Path) -> Path:
    (folder,) = (tmp / "output" / "coco").iterdir()
    return folder


def roles(config: Path) -> dict[str, str | None]:
    """The config's DISTILLER.TEACHER (None when its method distils from none) and DISTILLER.STUDENT."""
    cfg = load_cfg(str(config))
    distils = get_distiller_class(cfg.DISTILLER.TYPE).declares.requires_teacher
    return {"teacher": cfg.DISTILLER.TEACHER if distils else None, "student": cfg.DISTILLER.STUDENT}


def start_train(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(THREADS), PYTHONUNBUFFERED="1")
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, str(REPO / "tools" / "train.py"), *args], cwd=str(REPO), env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def student_weights_of(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "student_latest", weights_only=False)["model"]
