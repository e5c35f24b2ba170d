"""COCO box evaluation of a detector or a detection distiller over an evaluation loader (one process or torchrun).

Each rank runs its share of the test set; detections go back to the original image size (detectron2's
detector_postprocess) and to the JSON's category ids, rank 0 gathers them and runs pycocotools, every rank gets the
metrics.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from mdistiller import distributed
from mdistiller.detection.coco import CocoDetection
from mdistiller.detection.detector import Detector, model_inputs
from mdistiller.detection.evaluate import boxes_to_original, coco_box_metrics, detections_to_coco_json
from mdistiller.errors import MdistillerError
from mdistiller.files import atomic_write_text


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel


def detect(model: nn.Module, images: list[Tensor], targets: list[dict] | None = None) -> list[dict]:
    """Eval-mode detections per image {boxes (xyxy in the resized image), scores, labels (bg-first 1..80)} of a bare
    Detector (fed through `model_inputs`) or a detection distiller (its eval forward(images=..., targets=...))."""
    if isinstance(_unwrap(model), Detector):
        return model(model_inputs(_unwrap(model), images))
    return model(images=images, targets=targets)


def coco_dataset_of(loader: DataLoader) -> CocoDetection:
    """The CocoDetection under an evaluation loader (through a rank's Subset)."""
    dataset = loader.dataset
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if not isinstance(dataset, CocoDetection):
        raise MdistillerError(f"detection evaluation needs a COCO test loader, got a {type(dataset).__name__}")
    return dataset


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    return value


def to_original(detection: dict, target: dict) -> dict[str, Any]:
    """One image's detections as numpy in the original image (clipped, empty boxes dropped), contiguous labels 0..79."""
    boxes, keep = boxes_to_original(detection["boxes"].detach().float().cpu(), tuple(target["size"]),
                                    tuple(target["orig_size"]))
    return {"image_id": int(target["image_id"]), "boxes": boxes[keep].numpy(),
            "scores": detection["scores"].detach().float().cpu()[keep].numpy(),
            "labels": (detection["labels"].detach().cpu()[keep] - 1).numpy()}


def _metrics(ann_file: str, detections: list[dict], category_ids: list[int],
             results_json: str | None) -> dict[str, float]:
    detections = sorted(detections, key=lambda d: d["image_id"])
    if results_json is not None:
        results = detections_to_coco_json(detections, category_ids)
        atomic_write_text(results_json, json.dumps(results))
    metrics = coco_box_metrics(ann_file, detections, category_ids)
    metrics["detections"] = float(sum(len(d["scores"]) for d in detections))
    return metrics


def evaluate_detection(model: nn.Module, loader: DataLoader, device: torch.device | str, desc: str = "eval",
                       results_json: str | None = None) -> dict[str, float]:
    """COCO box {AP, AP50, AP75, APs, APm, APl} in percent (NaN where the ground truth has no box of that size),
    plus "detections" (their count), of `model` (a Detector or a detection distiller) on `loader`'s batches
    ({"images", "targets"}, eval_loader). Runs under no_grad in eval mode (the training mode is restored after);
    under torchrun each rank evaluates its shard, rank 0 scores the gathered detections and every rank returns the
    same dict. With `results_json`, rank 0 also writes the COCO results list there (atomically). `desc` names the
    pass in errors."""
    dataset = coco_dataset_of(loader)
    device = torch.device(device)
    was_training = model.training
    model.eval()
    mine: list[dict] = []
    try:
        with torch.no_grad():
            for batch in loader:
                images = _to_device(batch["images"], device)
                targets = _to_device(batch["targets"], device)
                outputs = detect(model, images, targets)
                if len(outputs) != len(targets):
                    raise MdistillerError(f"{desc}: the model gave {len(outputs)} results for {len(targets)} images")
                mine.extend(to_original(out, tgt) for out, tgt in zip(outputs, targets))
    finally:
        model.train(was_training)
    gathered = [d for part in distributed.all_gather_object(mine) for d in part]
    seen = [d["image_id"] for d in gathered]
    if len(set(seen)) != len(seen):
        raise MdistillerError(f"{desc}: an image was evaluated twice (overlapping shards)")
    metrics = distributed.on_main_then_share(
        lambda: _metrics(dataset.ann_file, gathered, dataset.category_ids, results_json))
    return distributed.broadcast_object(metrics)

