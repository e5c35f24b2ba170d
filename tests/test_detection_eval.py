"""COCO box/mask AP through pycocotools (issue 26, spec detection.md 5.2)."""

import json
import math

import numpy as np
import pytest
import torch

from mdistiller.detection.evaluate import (
    boxes_to_original,
    coco_box_metrics,
    coco_mask_metrics,
    detections_to_coco_json,
)
from mdistiller.errors import MdistillerError

from coco_files import write_synthetic_coco

pytest.importorskip("pycocotools")


@pytest.fixture(scope="module")
def gt(tmp_path_factory):
    _, ann_file = write_synthetic_coco(str(tmp_path_factory.mktemp("coco")), n_images=5)
    with open(ann_file) as f:
        return ann_file, json.load(f)


def gt_as_detections(data, keep=lambda ann: True, shift=False, masks=False):
    """Every non-crowd ground-truth box as a detection with score 1 and its contiguous label."""
    to_label = {c: i for i, c in enumerate(sorted(c["id"] for c in data["categories"]))}
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    dets = []
    for im in data["images"]:
        anns = [a for a in data["annotations"] if a["image_id"] == im["id"] and not a["iscrowd"] and keep(a)]
        boxes = []
        for a in anns:
            x, y, w, h = a["bbox"]
            dx = w if shift else 0.0  # a full box width to the right: IoU 0 with its ground truth
            boxes.append([x + dx, y, x + dx + w, y + h])
        det = {"image_id": im["id"], "boxes": torch.tensor(boxes).reshape(-1, 4),
               "scores": torch.ones(len(anns)), "labels": torch.tensor([to_label[a["category_id"]] for a in anns])}
        if masks:
            h, w = sizes[im["id"]]
            m = np.zeros((len(anns), h, w), dtype=bool)
            for k, a in enumerate(anns):
                x, y, bw, bh = (int(v) for v in a["bbox"])
                m[k, y:y + bh, x:x + bw] = True
            det["masks"] = torch.from_numpy(m)
        dets.append(det)
    return dets


def test_ground_truth_as_detections_gives_ap_100(gt):
    ann_file, data = gt
    metrics = coco_box_metrics(ann_file, gt_as_detections(data))
    assert metrics["AP"] == metrics["AP50"] == metrics["AP75"] == pytest.approx(100.0)
    assert all(math.isnan(v) or v == pytest.approx(100.0) for v in metrics.values())
    from_dict = coco_box_metrics(data, gt_as_detections(data))
    assert all(from_dict[k] == v or math.isnan(from_dict[k]) and math.isnan(v) for k, v in metrics.items())


def test_ground_truth_masks_give_mask_ap_100(gt):
    ann_file, data = gt
    metrics = coco_mask_metrics(ann_file, gt_as_detections(data, masks=True))
    assert metrics["AP"] == metrics["AP50"] == metrics["AP75"] == pytest.approx(100.0)


def test_boxes_shifted_a_full_width_give_ap50_0(gt):
    ann_file, data = gt
    metrics = coco_box_metrics(ann_file, gt_as_detections(data, shift=True))
    assert metrics["AP50"] == 0.0 and metrics["AP"] == 0.0


def test_wrong_category_map_gives_0(gt):
    ann_file, data = gt
    metrics = coco_box_metrics(ann_file, gt_as_detections(data), label_to_category_id=[18, 90, 1])
    assert metrics["AP"] == 0.0 and metrics["AP50"] == 0.0


def test_half_found_matches_the_101_point_rule(gt):
    ann_file, data = gt
    dropped = {a["id"] for a in data["annotations"][::2]}
    metrics = coco_box_metrics(ann_file, gt_as_detections(data, keep=lambda a: a["id"] not in dropped))
    thresholds = np.linspace(0.0, 1.0, 101)
    expected = []
    for cat in sorted(c["id"] for c in data["categories"]):
        anns = [a for a in data["annotations"] if a["category_id"] == cat and not a["iscrowd"]]
        recall = sum(a["id"] not in dropped for a in anns) / len(anns)
        # precision is 1 at every threshold some reached recall attains, 0 beyond (and everywhere when none is found)
        reached = [r for r in thresholds if r <= recall] if recall > 0 else []
        expected.append(len(reached) / 101)
    assert [round(e * 101) for e in expected] == [0, 101, 51]  # category 1: none found, 18: all, 90: half
    assert metrics["AP50"] == pytest.approx(100 * sum(expected) / len(expected))


def test_contiguous_labels_map_back_to_category_ids():
    det = {"image_id": 7, "boxes": torch.tensor([[1.0, 2.0, 4.0, 8.0]]), "scores": torch.tensor([0.5]),
           "labels": torch.tensor([2])}
    assert detections_to_coco_json([det], [1, 18, 90]) == [
        {"image_id": 7, "category_id": 90, "bbox": [1.0, 2.0, 3.0, 6.0], "score": 0.5}]


def test_no_detections_give_zero_and_bad_inputs_refuse(gt):
    ann_file, data = gt
    empty = [{"image_id": 10, "boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}]
    areas = [a["area"] for a in data["annotations"] if not a["iscrowd"]]
    has = {"APs": any(a < 32**2 for a in areas), "APm": any(32**2 <= a < 96**2 for a in areas),
           "APl": any(a >= 96**2 for a in areas)}
    assert has["APs"] and has["APm"] and not has["APl"]  # the synthetic set has small and medium boxes only
    for metrics in (coco_box_metrics(ann_file, empty), coco_box_metrics(ann_file, [])):
        assert metrics["AP"] == metrics["AP50"] == metrics["AP75"] == 0.0
        assert all(metrics[k] == 0.0 if present else math.isnan(metrics[k]) for k, present in has.items())
    bad_label = [{"image_id": 10, "boxes": torch.ones(1, 4), "scores": torch.ones(1), "labels": torch.tensor([3])}]
    with pytest.raises(MdistillerError, match="label 3 outside 0..2"):
        coco_box_metrics(ann_file, bad_label)
    unknown = [dict(bad_label[0], image_id=999, labels=torch.tensor([0]))]
    with pytest.raises(MdistillerError, match="not in the ground truth"):
        coco_box_metrics(ann_file, unknown)
    with pytest.raises(MdistillerError, match="not found"):
        coco_box_metrics(ann_file + ".missing", empty)
    with pytest.raises(MdistillerError, match="needs 'masks'"):
        coco_mask_metrics(ann_file, gt_as_detections(data))


def test_boxes_back_to_original_size():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 60.0], [150.0, 0.0, 170.0, 10.0], [170.0, 5.0, 180.0, 9.0]])
    out, keep = boxes_to_original(boxes, size=(80, 160), orig_size=(40, 80))  # half size; the last box is outside
    assert out.tolist() == [[5.0, 10.0, 25.0, 30.0], [75.0, 0.0, 80.0, 5.0], [80.0, 2.5, 80.0, 4.5]]
    assert keep.tolist() == [True, True, False]
