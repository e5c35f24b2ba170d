"""Details of detectron2 (commit 221448e4) that the detection data and evaluation code reproduce, each checked by hand
against a value detectron2's own code path gives (issue 26)."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mdistiller.detection.coco import CocoDetection
from mdistiller.detection.evaluate import coco_mask_metrics, detections_to_coco_json
from mdistiller.detection.transforms import Geometry

pytest.importorskip("pycocotools")


class Fixed:
    """A transform plan that always gives the same geometry."""

    def __init__(self, geometry: Geometry):
        self.geometry = geometry

    def plan(self, height, width, generator=None):
        return self.geometry


def write_coco(root, height, width, annotations):
    """One gray PNG of height x width (id 1) and an instances JSON with `annotations` (category 7)."""
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 90, dtype=np.uint8)).save(os.path.join(root, "img", "a.png"))
    anns = [dict({"id": k + 1, "image_id": 1, "category_id": 7, "iscrowd": 0}, **a) for k, a in enumerate(annotations)]
    data = {"images": [{"id": 1, "file_name": "a.png", "height": height, "width": width}], "annotations": anns,
            "categories": [{"id": 7, "name": "thing", "supercategory": "thing"}]}
    ann_file = os.path.join(root, "instances.json")
    with open(ann_file, "w") as f:
        json.dump(data, f)
    return os.path.join(root, "img"), ann_file, data


def test_json_bbox_is_xywh_in_the_boxes_float32():
    # detectron2's instances_to_coco_json converts the float32 box tensor: w = float32(x2) - float32(x1) in float32
    x1, x2 = np.float32(0.1), np.float32(1000.3)
    expected_w = float(np.float32(x2 - x1))
    assert expected_w != float(x2) - float(x1)  # the float64 difference is another number
    det = {"image_id": 3, "boxes": torch.tensor([[x1, 2.0, x2, 50.0]]), "scores": torch.tensor([0.5]),
           "labels": torch.tensor([0])}
    (entry,) = detections_to_coco_json([det], [7])
    assert entry["bbox"] == [float(x1), 2.0, expected_w, 48.0]
    assert entry["category_id"] == 7 and entry["score"] == 0.5


def test_mask_ap_takes_a_detections_area_from_its_mask(tmp_path):
    # Ground truth: one small 20x20 square (area 400). Detections: the ground truth's mask (score 0.5) and a higher
    # scored false positive made of two 10x10 squares far apart: mask area 200 (small), box 90x90 = 8100 (medium).
    # detectron2 drops "bbox" before mask AP, so COCO uses the mask area: the false positive counts among the small
    # objects and APs = 50 (precision 1/2 at recall 1); with the box area it would be ignored there (APs = 100).
    square = [10, 10, 30, 10, 30, 30, 10, 30]
    _, ann_file, data = write_coco(str(tmp_path), 200, 200, [
        {"bbox": [10.0, 10.0, 20.0, 20.0], "area": 400.0, "segmentation": [square]}])
    gt_mask = np.zeros((200, 200), dtype=bool)
    gt_mask[10:30, 10:30] = True
    fp_mask = np.zeros((200, 200), dtype=bool)
    fp_mask[100:110, 100:110] = True
    fp_mask[180:190, 180:190] = True
    det = {"image_id": 1, "boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0], [100.0, 100.0, 190.0, 190.0]]),
           "scores": torch.tensor([0.5, 0.9]), "labels": torch.tensor([0, 0]),
           "masks": torch.from_numpy(np.stack([gt_mask, fp_mask]))}
    metrics = coco_mask_metrics(data, [det])
    assert metrics["APs"] == pytest.approx(50.0)
    assert metrics["AP"] == pytest.approx(50.0)


def test_annotation_with_an_empty_segmentation_list_is_kept_for_boxes(tmp_path):
    # detectron2's load_coco_json filters polygons only when `segmentation` is truthy: [] keeps the instance; an
    # annotation whose polygons are all invalid (< 3 points) is dropped
    image_dir, ann_file, _ = write_coco(str(tmp_path), 40, 60, [
        {"bbox": [1.0, 2.0, 10.0, 12.0], "area": 120.0, "segmentation": []},
        {"bbox": [20.0, 5.0, 8.0, 8.0], "area": 64.0, "segmentation": [[20, 5, 28, 5]]},
        {"bbox": [30.0, 6.0, 9.0, 9.0], "area": 81.0, "segmentation": [[30, 6, 39, 6, 39, 15, 30, 15]]}])
    ds = CocoDetection(image_dir, ann_file, train=True, transform=Fixed(Geometry(40, 60)))
    _, target = ds[0]
    assert target["boxes"].tolist() == [[1.0, 2.0, 11.0, 14.0], [30.0, 6.0, 39.0, 15.0]]


def test_annotation_with_an_empty_segmentation_list_is_dropped_with_masks(tmp_path):
    # with masks, detectron2's filter_empty_instances drops an instance without polygons (PolygonMasks.nonempty)
    image_dir, ann_file, _ = write_coco(str(tmp_path), 40, 60, [
        {"bbox": [1.0, 2.0, 10.0, 12.0], "area": 120.0, "segmentation": []},
        {"bbox": [30.0, 6.0, 9.0, 9.0], "area": 81.0, "segmentation": [[30, 6, 39, 6, 39, 15, 30, 15]]}])
    ds = CocoDetection(image_dir, ann_file, train=True, transform=Fixed(Geometry(40, 60)), masks=True)
    _, target = ds[0]
    assert target["boxes"].tolist() == [[30.0, 6.0, 39.0, 15.0]]
    assert target["masks"].shape == (1, 40, 60) and int(target["masks"].sum()) == 81


def test_boxes_follow_detectron2s_float32_then_float64_chain(tmp_path):
    # detectron2: BoxMode.convert turns the JSON's [x, y, w, h] list into a float32 tensor (x2 = x + w in float32),
    # then the transforms scale and flip (x' = W - x) it in float64 (numpy) and clip it, and Boxes casts it to float32
    # once. For these values that differs both from float32 all the way and from float64 all the way.
    x, y, w, h = 123.456, 77.7, 301.17, 55.5
    image_dir, ann_file, _ = write_coco(str(tmp_path), 480, 640, [
        {"bbox": [x, y, w, h], "area": w * h, "segmentation": [[x, y, x + w, y, x + w, y + h]]}])
    f32 = np.float32
    x1, y1, x2, y2 = (float(v) for v in (f32(x), f32(y), f32(x) + f32(w), f32(y) + f32(h)))
    sx, sy = 1067 / 640, 800 / 480
    expected = np.array([1067 - x2 * sx, y1 * sy, 1067 - x1 * sx, y2 * sy]).astype(np.float32)
    all64 = np.array([1067 - (x + w) * sx, y * sy, 1067 - x * sx, (y + h) * sy]).astype(np.float32)
    all32 = np.array([1067 - f32(f32(x2) * f32(sx)), f32(f32(y1) * f32(sy)), 1067 - f32(f32(x1) * f32(sx)),
                      f32(f32(y2) * f32(sy))], dtype=np.float32)
    assert not np.array_equal(expected, all64) and not np.array_equal(expected, all32)
    ds = CocoDetection(image_dir, ann_file, train=True, transform=Fixed(Geometry(800, 1067, flip=True)))
    _, target = ds[0]
    assert target["boxes"].dtype == torch.float32
    assert np.array_equal(target["boxes"][0].numpy(), expected)


def test_evaluation_with_masks_keeps_an_instance_without_polygons(tmp_path):
    image_dir, ann_file, _ = write_coco(str(tmp_path), 40, 60, [
        {"bbox": [1.0, 2.0, 10.0, 12.0], "area": 120.0, "segmentation": []}])
    _, target = CocoDetection(image_dir, ann_file, train=False, transform=Fixed(Geometry(40, 60)), masks=True)[0]
    assert target["boxes"].tolist() == [[1.0, 2.0, 11.0, 14.0]]
    assert target["masks"].shape == (1, 40, 60) and int(target["masks"].sum()) == 0
