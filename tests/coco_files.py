"""The tests' synthetic COCO-format folder: small PNGs with filled rectangles and an instances JSON describing them."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
from PIL import Image

CATEGORY_IDS = (1, 18, 90)  # sparse, as COCO's; labels 0, 1, 2
SIZES = ((96, 128), (128, 96))  # (h, w): wide, tall


def write_synthetic_coco(root: str, n_images: int = 5, seed: int = 0, crowd_only: bool = True,
                         empty: bool = True) -> tuple[str, str]:
    """Write `n_images` PNGs and `instances.json` under `root`; returns (image_dir, ann_file).

    Image i (id 10 + i) alternates 96x128 / 128x96 and holds 1-3 filled rectangles (category ids 1, 18, 90 in turn,
    polygon segmentation = the rectangle). With `crowd_only` the second-to-last image has one crowd box only, with
    `empty` the last one has no annotation (both dropped for training, kept for evaluation).
    """
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for i in range(n_images):
        h, w = SIZES[i % 2]
        image_id = 10 + i
        pixels = np.full((h, w, 3), 30, dtype=np.uint8)
        if empty and i == n_images - 1:
            count, crowd = 0, 0
        elif crowd_only and i == n_images - 2:
            count, crowd = 1, 1
        else:
            count, crowd = 1 + i % 3, 0
        for k in range(count):
            bw, bh = int(rng.integers(12, w // 2)), int(rng.integers(12, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            pixels[y:y + bh, x:x + bw] = (60 * (k + 1), 200 - 50 * k, 40 * i % 256)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id,
                "category_id": CATEGORY_IDS[(i + k) % len(CATEGORY_IDS)],
                "bbox": [float(x), float(y), float(bw), float(bh)], "area": float(bw * bh), "iscrowd": crowd,
                "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]],
            })
        name = f"{image_id:012d}.png"
        Image.fromarray(pixels).save(os.path.join(image_dir, name))
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
    categories = [{"id": c, "name": f"thing{c}", "supercategory": "thing"} for c in reversed(CATEGORY_IDS)]
    ann_file = os.path.join(root, "instances.json")
    with open(ann_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return image_dir, ann_file


# COCO's 80 category ids (1..90 with ten gaps): the detector has 80 foreground classes; 1, 18, 90 are among them
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def write_coco_split(root: str, split: str, n_images: int = 10, seed: int = 0,
                     categories: list[int] = COCO_CATEGORY_IDS) -> dict:
    """The synthetic set as split `split` of a detectron2-layout root (annotations/instances_<split>.json and the
    image folder <split>/), with COCO's 80 categories (or `categories`); returns the JSON's contents."""
    tmp = os.path.join(root, f"_{split}")
    image_dir, ann_file = write_synthetic_coco(tmp, n_images=n_images, seed=seed)
    with open(ann_file) as f:
        data = json.load(f)
    data["categories"] = [{"id": c, "name": f"c{c}", "supercategory": "thing"} for c in categories]
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump(data, f)
    shutil.move(image_dir, os.path.join(root, split))
    shutil.rmtree(tmp)
    return data
