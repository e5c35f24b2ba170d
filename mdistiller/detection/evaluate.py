"""COCO box and mask AP with pycocotools, reported as detectron2's COCOEvaluator does (percent; NaN where COCO has
no value). Detections carry contiguous labels 0..K-1; they go back to the JSON's category ids (sorted order).

Checked against detectron2 221448e4 (evaluation/coco_evaluation.py, modeling/postprocessing.py): xyxy -> xywh in the
boxes' own dtype (float32 for a detector's output), mask AP scored without the `bbox` field (so COCO takes a
detection's area from its mask, not its box, for APs/APm/APl), maxDets (1, 10, 100), every ground-truth image.
Remaining difference: detectron2 scores with its own C++ COCOeval (`COCOeval_opt`, meant to equal pycocotools);
this module uses pycocotools' COCOeval."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from typing import Mapping, Sequence

import numpy as np
import torch

from mdistiller.errors import MdistillerError

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _pycocotools():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise MdistillerError('COCO evaluation needs pycocotools: pip install -e ".[detection]"') from None
    return COCO, COCOeval


def load_ground_truth(gt: str | os.PathLike | dict):
    """A pycocotools COCO object from an instances JSON path or an already loaded dict."""
    COCO, _ = _pycocotools()
    if isinstance(gt, (str, os.PathLike)):
        if not os.path.isfile(gt):
            raise MdistillerError(f"COCO annotation file not found: {gt}")
        try:
            with open(gt) as f:
                gt = json.load(f)
        except json.JSONDecodeError as err:
            raise MdistillerError(f"COCO annotation file is not valid JSON: {str(err).splitlines()[0]}") from None
    if not isinstance(gt, dict) or any(k not in gt for k in ("images", "annotations", "categories")):
        raise MdistillerError("COCO ground truth must have 'images', 'annotations' and 'categories'")
    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def boxes_to_original(boxes: torch.Tensor, size: tuple[int, int], orig_size: tuple[int, int]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """detectron2's detector_postprocess for boxes: xyxy boxes of the resized (h, w) image scaled to the original
    (h, w), clipped to it; returns (boxes, keep-mask of the non-empty ones)."""
    scale = torch.tensor([orig_size[1] / size[1], orig_size[0] / size[0]] * 2, dtype=boxes.dtype, device=boxes.device)
    out = boxes * scale
    out[:, 0::2] = out[:, 0::2].clamp(0, orig_size[1])
    out[:, 1::2] = out[:, 1::2].clamp(0, orig_size[0])
    return out, (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])


def detections_to_coco_json(detections: Sequence[Mapping], label_to_category_id: Sequence[int]) -> list[dict]:
    """COCO result entries from per-image dicts {image_id, boxes (N,4) xyxy in original pixels, scores, labels
    [, masks (N,H,W) bool at original size]}, as detectron2's instances_to_coco_json."""
    results = []
    for det in detections:
        boxes = _numpy(det["boxes"]).reshape(-1, 4)
        # width and height in the boxes' dtype, as detectron2's BoxMode.convert (float32 rounding included)
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).tolist()
        scores, labels = _numpy(det["scores"]).reshape(-1), _numpy(det["labels"]).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise MdistillerError(f"image {det['image_id']}: {len(boxes)} boxes, {len(scores)} scores and "
                                  f"{len(labels)} labels")
        rles = None
        if "masks" in det:
            from pycocotools import mask as mask_util
            masks = _numpy(det["masks"]).astype(np.uint8)
            rles = [mask_util.encode(np.asfortranarray(m[:, :, None]))[0] for m in masks]
            for rle in rles:
                rle["counts"] = rle["counts"].decode("utf-8")
        for k in range(len(boxes)):
            label = int(labels[k])
            if not 0 <= label < len(label_to_category_id):
                raise MdistillerError(f"image {det['image_id']}: label {label} outside "
                                      f"0..{len(label_to_category_id) - 1}")
            entry = {"image_id": int(det["image_id"]), "category_id": int(label_to_category_id[label]),
                     "bbox": xywh[k], "score": float(scores[k])}
            if rles is not None:
                entry["segmentation"] = rles[k]
            results.append(entry)
    return results


def _no_results(coco_gt):
    """An empty result set (pycocotools' loadRes fails on []); scored, it gives AP 0 where there is ground truth."""
    COCO, _ = _pycocotools()
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "categories": copy.deepcopy(coco_gt.dataset[
        "categories"]), "annotations": []}
    coco_dt.createIndex()
    return coco_dt


def coco_metrics(gt: str | os.PathLike | dict, detections: Sequence[Mapping], iou_type: str = "bbox",
                 label_to_category_id: Sequence[int] | None = None) -> dict[str, float]:
    """{AP, AP50, AP75, APs, APm, APl} in percent for `iou_type` "bbox" or "segm" (NaN where the ground truth has no
    instance of that size). No detection at all scores 0 where there is ground truth (detectron2 reports NaN then)."""
    if iou_type not in ("bbox", "segm"):
        raise MdistillerError(f"iou_type must be 'bbox' or 'segm', not {iou_type!r}")
    _, COCOeval = _pycocotools()
    coco_gt = load_ground_truth(gt)
    if label_to_category_id is None:
        label_to_category_id = sorted(coco_gt.getCatIds())
    results = detections_to_coco_json(detections, label_to_category_id)
    if iou_type == "segm" and results and "segmentation" not in results[0]:
        raise MdistillerError("mask AP needs 'masks' in the detections")
    unknown = {r["image_id"] for r in results} - set(coco_gt.getImgIds())
    if unknown:
        raise MdistillerError(f"detections for image ids not in the ground truth: {sorted(unknown)[:5]}")
    if iou_type == "segm":
        # with a bbox present, pycocotools' loadRes takes the box area as the detection's area
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results) if results else _no_results(coco_gt)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {m: float(evaluator.stats[i] * 100) if evaluator.stats[i] >= 0 else float("nan")
            for i, m in enumerate(METRICS)}


def coco_box_metrics(gt: str | os.PathLike | dict, detections: Sequence[Mapping],
                     label_to_category_id: Sequence[int] | None = None) -> dict[str, float]:
    """COCO box {AP, AP50, AP75, APs, APm, APl} in percent (detectron2's bbox results)."""
    return coco_metrics(gt, detections, "bbox", label_to_category_id)


def coco_mask_metrics(gt: str | os.PathLike | dict, detections: Sequence[Mapping],
                      label_to_category_id: Sequence[int] | None = None) -> dict[str, float]:
    """COCO mask {AP, AP50, AP75, APs, APm, APl} in percent (detectron2's segm results)."""
    return coco_metrics(gt, detections, "segm", label_to_category_id)
