"""detectron2-named weights for tests: an inverse name map (torchvision FasterRCNN -> detectron2) written by hand with
string edits (not the converter's regexes), and model-zoo style `.pkl` files of it."""

from __future__ import annotations

import pickle

import numpy as np
import torch

from mdistiller.detection.detectron2_weights import build_torchvision_faster_rcnn

K = 80  # COCO foreground classes: detectron2 cls_score has K + 1 rows (background last)


def to_detectron2_name(tv: str) -> str:
    """The detectron2 name of a torchvision FasterRCNN name (inverse map, written by hand)."""
    parts = tv.split(".")
    if tv == "backbone.body.conv1.weight":
        return "backbone.bottom_up.stem.conv1.weight"
    if parts[:3] == ["backbone", "body", "bn1"]:
        return "backbone.bottom_up.stem.conv1.norm." + parts[3]
    if parts[:2] == ["backbone", "body"]:  # backbone.body.layerL.b.<module>...
        stage = int(parts[2][len("layer"):]) + 1
        block = parts[3]
        module, rest = parts[4], parts[5:]
        if module.startswith("conv"):
            inner = f"{module}.weight"
        elif module.startswith("bn"):
            inner = f"conv{module[2:]}.norm.{rest[0]}"
        elif rest[0] == "0":  # downsample.0.weight
            inner = "shortcut.weight"
        else:  # downsample.1.<field>
            inner = f"shortcut.norm.{rest[1]}"
        return f"backbone.bottom_up.res{stage}.{block}.{inner}"
    if parts[:2] == ["backbone", "fpn"]:
        kind = {"inner_blocks": "lateral", "layer_blocks": "output"}[parts[2]]
        return f"backbone.fpn_{kind}{int(parts[3]) + 2}.{parts[5]}"
    if parts[:2] == ["rpn", "head"]:
        module = {"conv": "conv", "cls_logits": "objectness_logits", "bbox_pred": "anchor_deltas"}[parts[2]]
        return f"proposal_generator.rpn_head.{module}.{parts[-1]}"
    if parts[:2] == ["roi_heads", "box_head"]:
        return f"roi_heads.box_head.{ {'fc6': 'fc1', 'fc7': 'fc2'}[parts[2]] }.{parts[3]}"
    assert parts[:2] == ["roi_heads", "box_predictor"], tv
    return tv


def to_detectron2_weights(tv_sd: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """detectron2-named numpy weights of a torchvision state dict, predictor rows in detectron2's order."""
    out = {}
    for name, value in tv_sd.items():
        v = value.numpy().copy()
        if name.startswith("roi_heads.box_predictor.cls_score."):
            v = np.concatenate([v[1:], v[:1]])  # background from first to last
        elif name.startswith("roi_heads.box_predictor.bbox_pred."):
            v = v[4:]  # detectron2 has no background deltas
        out[to_detectron2_name(name)] = v
    return out


def random_state_dict(depth: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd = build_torchvision_faster_rcnn(depth, K + 1).state_dict()
    return {k: torch.randn(v.shape, generator=gen) for k, v in sd.items()}


def write_pkl(path, weights: dict, protocol: int = 2, **extra) -> str:
    with open(path, "wb") as f:
        pickle.dump({"model": weights, "__author__": "Detectron2 Model Zoo", **extra}, f, protocol=protocol)
    return str(path)


# A random ResNet body fed detectron2's BGR, std-1 input (values up to ~150) grows its maps to thousands and more
# (FrozenBN is the identity, and every block adds its branch), and the losses of such maps overflow in a step or two.
# Trained weights keep the maps small; so does this: the stem scaled by STEM_SCALE and each residual branch's last
# FrozenBN scale by BRANCH_SCALE (Goyal et al.'s zero-init-residual idea, not quite zero).
STEM_SCALE = 1 / 100
BRANCH_SCALE = 0.1


def tame(state: dict) -> dict:
    """A random detector / backbone state dict (torchvision names) with its maps at trained-network sizes."""
    state = dict(state)
    state["backbone.body.conv1.weight"] = state["backbone.body.conv1.weight"] * STEM_SCALE
    last_bn = "bn3" if "backbone.body.layer1.0.bn3.weight" in state else "bn2"
    for name in [n for n in state if n.startswith("backbone.body.layer") and f".{last_bn}.weight" in n]:
        state[name] = state[name] * BRANCH_SCALE
    return state


def write_teacher_pkl(path, arch: str, seed: int = 0) -> str:
    """A model-zoo style `.pkl` of a freshly initialised teacher detector (`arch` R50 / R101; seeded; `tame`d), its
    FrozenBN statistics sane (mean 0, var 1) and its outputs finite."""
    from mdistiller.detection.detector import build_teacher

    torch.manual_seed(seed)
    return write_pkl(path, to_detectron2_weights(tame(build_teacher(arch).state_dict())))


def write_bundled_student(path, arch: str, seed: int = 0) -> str:
    """Upstream's release-bundle layout (`{"model": {detectron2 name: tensor}}`) holding only a fresh `arch` (R18 /
    R50) student backbone, `tame`d: DETECTION.STUDENT_WEIGHTS as the configs/coco files use it."""
    from mdistiller.detection.detector import build_student

    torch.manual_seed(seed)
    state = {k: v for k, v in tame(build_student(arch).state_dict()).items() if k.startswith("backbone.body.")}
    torch.save({"model": {to_detectron2_name(k): v.clone() for k, v in state.items()}}, path)
    return str(path)
