"""What a run trains, as the trainer needs to know it: how the student is evaluated, which of its numbers ranks the
checkpoints, and how the test numbers are named in the worklog, TensorBoard, the log line and the result file.

The task is declared, never guessed: DATASET.TYPE's registration says it (`DatasetType.task`) and every distiller
declares the one it trains (`Declaration.task`); validation refuses a mismatch. "classification" is every
image-classification recipe (top-1); "detection" is COCO object detection with Faster R-CNN FPN (box AP, detectron2's
evaluation through pycocotools).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..dataset import DATASETS
from ..detection.inference import evaluate_detection
from .evaluate import evaluate as evaluate_classifier

Evaluate = Callable[[nn.Module, Any, torch.device, str, torch.memory_format], dict]


@dataclass(frozen=True)
class Task:
    """One kind of training run: its evaluation and the names of its numbers."""

    name: str
    evaluate: Evaluate  # (distiller, test loader, device, progress label, memory format) -> test numbers
    metric: str  # the test number that ranks checkpoints (higher is better): `best`, best_acc, the result line
    metric_label: str  # that number in the log line
    result_name: str  # that number in the result file: `best_<result_name>=`
    test_columns: Callable[[dict], dict]  # test numbers -> the worklog / TensorBoard scalars
    test_summary: Callable[[dict], str]  # test numbers -> the test part of the log line


def _classification_eval(model: nn.Module, loader, device: torch.device, desc: str,
                         fmt: torch.memory_format) -> dict:
    return evaluate_classifier(model, loader, device, desc=desc, fmt=fmt, reduce=True)


def _detection_eval(model: nn.Module, loader, device: torch.device, desc: str, fmt: torch.memory_format) -> dict:
    return evaluate_detection(model, loader, device, desc=desc)


def _ap(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}"


DETECTION_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")

TASKS: dict[str, Task] = {
    "classification": Task(
        name="classification",
        evaluate=_classification_eval,
        metric="top1",
        metric_label="top-1",
        result_name="top1",
        test_columns=lambda test: {"test_acc": test["top1"], "test_acc_top5": test["top5"], "test_loss": test["loss"]},
        test_summary=lambda test: f"test top-1 {test['top1']:.2f}  top-5 {test['top5']:.2f}",
    ),
    "detection": Task(
        name="detection",
        evaluate=_detection_eval,
        metric="AP",
        metric_label="box AP",
        result_name="AP",
        test_columns=lambda test: {f"test_{name}": test[name] for name in DETECTION_COLUMNS},
        test_summary=lambda test: "box AP " + _ap(test["AP"]) + "  AP50 " + _ap(test["AP50"]) + "  AP75 "
        + _ap(test["AP75"]),
    ),
}


def task_name(cfg) -> str:
    """The task DATASET.TYPE declares."""
    return DATASETS.get(cfg.DATASET.TYPE).task


def task_of(cfg) -> Task:
    """The Task of a config's DATASET.TYPE."""
    return TASKS[task_name(cfg)]
