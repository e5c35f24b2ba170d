"""detectron2 model-zoo Faster R-CNN weights in torchvision's `FasterRCNN`: safe reading, the name map, the class
reordering, and a strict load (spec: /work/shared/spec/detection.md, section 3).

- Reading: a model-zoo `.pkl` is a pickle (`encoding="latin1"`) of `{"model": {name: numpy array}, "__author__": ..}`;
  it is read with an unpickler that resolves only numpy's array/dtype reconstruction (and `_codecs.encode`, which
  Python 3 writes for bytes at protocol 2) and refuses any other global, so a crafted file cannot run code. A torch
  `.pth` holding `{"model": state_dict}` (a detectron2 training checkpoint) is read with `weights_only=True`.
  detectron2 itself is never imported.
- Names: see `detectron2_to_torchvision_name` (detectron2 ResNet-FPN / RPN / StandardROIHeads with FrozenBN ->
  `FasterRCNN(resnet_fpn_backbone(..., norm_layer=FrozenBatchNorm2d))`). detectron2's FrozenBN keeps weight, bias,
  running_mean, running_var as buffers, exactly torchvision's `FrozenBatchNorm2d` (eps 1e-5 on both sides).
- Classes: detectron2's box predictor puts background LAST (`cls_score` K+1 rows: classes 0..K-1, then background)
  and regresses K class-specific boxes (`bbox_pred` 4K rows); torchvision puts background FIRST (label 0) and has
  4(K+1) delta rows, background's included. So `cls_score` rows become `[K, 0, 1, .., K-1]` and `bbox_pred` gets 4
  zero rows (never used: torchvision drops background boxes) in front of detectron2's rows in their order; the
  detectron2 class k is torchvision label k+1. Box deltas share the order (dx, dy, dw, dh) and weights (10, 10, 5, 5).
- Input: the converted model still expects detectron2's caffe2 input (BGR, 0-255, minus `PIXEL_MEAN`, std 1) unless
  `flip_input_channels` reverses the stem's input channels (then RGB, 0-255, minus the mean in RGB order) - exact.
  The model-zoo ResNets put the stride of res3-5's first block on the 1x1 conv (`STRIDE_IN_1X1`): the builder moves
  torchvision's stride there (`stride_in_1x1=True`).
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ..errors import MdistillerError
from .detector import stride_in_1x1_

# detectron2's default caffe2-style input of these teachers (TEACHER.INPUT.*), stored beside the converted weights
DETECTRON2_PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)
DETECTRON2_PIXEL_STD = (1.0, 1.0, 1.0)

# keys some model-zoo files carry that are not weights of the network (anchors are regenerated, input stats are
# configuration)
_DROPPED = re.compile(r"^(pixel_mean|pixel_std|proposal_generator\.anchor_generator\.cell_anchors\.\d+)$")
_MASK_HEAD = re.compile(r"^roi_heads\.mask_head\.")

_NORM = r"norm\.(weight|bias|running_mean|running_var)"
_STEM = re.compile(rf"^backbone\.bottom_up\.stem\.conv1\.(weight|{_NORM})$")
_BLOCK = re.compile(rf"^backbone\.bottom_up\.res([2-5])\.(\d+)\.(conv[1-3]|shortcut)\.(weight|{_NORM})$")
_FPN = re.compile(r"^backbone\.fpn_(lateral|output)([2-5])\.(weight|bias)$")
_RPN = {"conv": "rpn.head.conv.0.0", "objectness_logits": "rpn.head.cls_logits", "anchor_deltas": "rpn.head.bbox_pred"}
_RPN_RE = re.compile(r"^proposal_generator\.rpn_head\.(conv|objectness_logits|anchor_deltas)\.(weight|bias)$")
_BOX_HEAD = re.compile(r"^roi_heads\.box_head\.fc([12])\.(weight|bias)$")
_PREDICTOR = re.compile(r"^roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)$")

SUPPORTED_DEPTHS = {18: "resnet18", 34: "resnet34", 50: "resnet50", 101: "resnet101", 152: "resnet152"}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that resolves numpy's array/dtype reconstruction and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}:
            return np.zeros(0).__reduce__()[0]  # numpy's own _reconstruct, whichever module holds it
        if (module, name) in {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}:
            return np.float32(0).__reduce__()[0]
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if (module, name) == ("_codecs", "encode"):  # Python 3's spelling of bytes at pickle protocol 2
            import codecs

            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only numpy arrays are allowed")


def _torch_load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or non-tensor file
        raise MdistillerError(f"detectron2 checkpoint {path} is unreadable or not tensors only "
                              f"({type(exc).__name__}: {str(exc)[:160]})") from None


def read_weights_file(path: str) -> Any:
    """The object a weights file holds, read safely whatever its extension: a pickle with the numpy-only unpickler
    (detectron2's model zoo, MSRA caffe2 `.pkl`), a `torch.save`d file with weights_only."""
    if not os.path.isfile(path):
        raise MdistillerError(f"detectron2 checkpoint not found: {path}")
    if zipfile.is_zipfile(path):  # torch.save's format since torch 1.6
        return _torch_load(path)
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except Exception as exc:  # UnpicklingError (refused global, corrupt file), EOFError, ...
        raise MdistillerError(f"detectron2 checkpoint {path} is not a safe numpy pickle "
                              f"({type(exc).__name__}: {str(exc)[:160]})") from None
    if isinstance(obj, int):  # the magic number that starts torch.save's legacy format
        obj = _torch_load(path)
    return obj


def select_weights(obj: Any, path: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """The `model` weights of a checkpoint object (`read_weights_file`) as CPU tensors; with `prefix`, only the
    names that start with it, prefix removed."""
    if not isinstance(obj, Mapping) or not isinstance(obj.get("model"), Mapping):
        raise MdistillerError(f"detectron2 checkpoint {path} holds no {{'model': {{name: array}}}} dict")
    weights = {}
    for name, value in obj["model"].items():
        name = str(name)
        if not name.startswith(prefix):
            continue
        if isinstance(value, (np.ndarray, np.generic)) and np.asarray(value).dtype.kind in "biuf":
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            raise MdistillerError(f"detectron2 checkpoint {path}: entry {name} is a {type(value).__name__}, "
                                  f"not an array")
        weights[name[len(prefix):]] = value
    if not weights:
        some = _listing(sorted(map(str, obj["model"])), 3)
        raise MdistillerError(f"detectron2 checkpoint {path} has no weights named {prefix}* (it has {some})")
    return weights


def read_detectron2_checkpoint(path: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """The `model` weights of a detectron2 checkpoint as CPU tensors: a model-zoo pickle (numpy-only unpickling) or a
    `torch.save`d file (weights_only), whatever its extension. With `prefix` (e.g. "teacher." for a file bundling
    teacher and student), only the names that start with it, prefix removed."""
    return select_weights(read_weights_file(path), path, prefix)


def detectron2_to_torchvision_name(name: str) -> str | None:
    """torchvision FasterRCNN's name for a detectron2 weight name, None when no rule covers it."""
    m = _STEM.match(name)
    if m:
        return "backbone.body.conv1.weight" if m.group(1) == "weight" else f"backbone.body.bn1.{m.group(2)}"
    m = _BLOCK.match(name)
    if m:
        stage, block, layer, what, norm_field = m.groups()
        prefix = f"backbone.body.layer{int(stage) - 1}.{block}."
        if layer == "shortcut":
            return prefix + ("downsample.0.weight" if what == "weight" else f"downsample.1.{norm_field}")
        j = layer[-1]
        return prefix + (f"conv{j}.weight" if what == "weight" else f"bn{j}.{norm_field}")
    m = _FPN.match(name)
    if m:
        kind, level, field = m.groups()
        blocks = "inner_blocks" if kind == "lateral" else "layer_blocks"
        return f"backbone.fpn.{blocks}.{int(level) - 2}.0.{field}"
    m = _RPN_RE.match(name)
    if m:
        return f"{_RPN[m.group(1)]}.{m.group(2)}"
    m = _BOX_HEAD.match(name)
    if m:
        return f"roi_heads.box_head.fc{int(m.group(1)) + 5}.{m.group(2)}"
    m = _PREDICTOR.match(name)
    if m:
        return name  # same name; rows reordered by reorder_predictor_rows
    return None


def reorder_predictor_rows(name: str, value: torch.Tensor) -> torch.Tensor:
    """detectron2's bg-last `cls_score` / K-class `bbox_pred` rows in torchvision's bg-first order (see the module
    docstring); any other tensor unchanged."""
    if name.startswith("roi_heads.box_predictor.cls_score."):
        return torch.cat([value[-1:], value[:-1]], dim=0)
    if name.startswith("roi_heads.box_predictor.bbox_pred."):
        return torch.cat([torch.zeros_like(value[:4]), value], dim=0)
    return value


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def convert_detectron2_state_dict(weights: Mapping[str, torch.Tensor], drop_mask_head: bool = False,
                                  flip_input_channels: bool = False) -> dict[str, torch.Tensor]:
    """detectron2 weights renamed and reordered for torchvision's FasterRCNN; a name no rule covers is refused.

    `drop_mask_head` drops a Mask R-CNN's `roi_heads.mask_head.*` (the distillation teacher runs without masks);
    `flip_input_channels` reverses the stem conv's input channels so the model takes RGB instead of BGR.
    """
    out: dict[str, torch.Tensor] = {}
    leftover = []
    for name, value in weights.items():
        if _DROPPED.match(name) or (drop_mask_head and _MASK_HEAD.match(name)):
            continue
        target = detectron2_to_torchvision_name(name)
        if target is None:
            leftover.append(name)
            continue
        value = reorder_predictor_rows(target, value.detach().clone())
        if flip_input_channels and target == "backbone.body.conv1.weight":
            value = value.flip(1).contiguous()
        out[target] = value
    if leftover:
        hint = " (a Mask R-CNN? pass drop_mask_head / --drop-mask-head)" if any(map(_MASK_HEAD.match, leftover)) \
            else ""
        raise MdistillerError(f"detectron2 weights with no torchvision name: {_listing(sorted(leftover))}{hint}")
    return out


def infer_depth(weights: Mapping[str, torch.Tensor]) -> int:
    """The ResNet depth of detectron2 weights, from the number of blocks in res4 and whether blocks have a conv3."""
    blocks = {int(m.group(1)) for m in (re.match(r"^backbone\.bottom_up\.res4\.(\d+)\.", n) for n in weights) if m}
    bottleneck = any(re.match(r"^backbone\.bottom_up\.res2\.0\.conv3\.", n) for n in weights)
    depth = {(False, 2): 18, (False, 6): 34, (True, 6): 50, (True, 23): 101, (True, 36): 152}.get(
        (bottleneck, len(blocks)))
    if depth is None:
        raise MdistillerError(f"detectron2 weights: {len(blocks)} res4 blocks "
                              f"({'bottleneck' if bottleneck else 'basic'}) match no ResNet-18/34/50/101/152")
    return depth


def infer_num_classes(weights: Mapping[str, torch.Tensor]) -> int:
    """torchvision's num_classes (foreground classes + background) from detectron2's `cls_score` rows."""
    score = weights.get("roi_heads.box_predictor.cls_score.weight")
    if score is None:
        raise MdistillerError("detectron2 weights have no roi_heads.box_predictor.cls_score.weight")
    return int(score.shape[0])


def build_torchvision_faster_rcnn(depth: int, num_classes: int = 81, stride_in_1x1: bool = True) -> nn.Module:
    """torchvision's ResNet-FPN FasterRCNN with FrozenBatchNorm2d, shaped as a detectron2 R-`depth`-FPN teacher.

    Only the module structure and names are set here (weights random); anchors, pooler and the resize of
    detectron2's recipe are the detection pipeline's business.
    """
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d

    if depth not in SUPPORTED_DEPTHS:
        raise MdistillerError(f"ResNet depth {depth} is not one of {sorted(SUPPORTED_DEPTHS)}")
    backbone = resnet_fpn_backbone(backbone_name=SUPPORTED_DEPTHS[depth], weights=None,
                                   norm_layer=FrozenBatchNorm2d, trainable_layers=5)
    if stride_in_1x1 and depth >= 50:
        stride_in_1x1_(backbone.body)
    return FasterRCNN(backbone, num_classes=num_classes)


def check_against_model(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """Refuse, in one line, converted weights whose names or shapes differ from the model's state dict."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    if missing:
        raise MdistillerError(f"the detectron2 weights lack {len(missing)} tensors of the torchvision model: "
                              f"{_listing(missing)}")
    if extra:
        raise MdistillerError(f"converted weights the torchvision model does not have: {_listing(extra)}")
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state_dict.items()
             if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise MdistillerError(f"shape mismatch (converted vs torchvision): {_listing(wrong, 4)}")


def load_detectron2_faster_rcnn(path: str, drop_mask_head: bool = False, flip_input_channels: bool = False,
                                stride_in_1x1: bool = True,
                                prefix: str = "") -> tuple[nn.Module, dict[str, torch.Tensor], int]:
    """(torchvision FasterRCNN holding a detectron2 checkpoint's weights, loaded strictly; the converted state dict;
    the ResNet depth)."""
    weights = read_detectron2_checkpoint(path, prefix)
    converted = convert_detectron2_state_dict(weights, drop_mask_head, flip_input_channels)
    depth = infer_depth(weights)
    model = build_torchvision_faster_rcnn(depth, infer_num_classes(weights), stride_in_1x1)
    check_against_model(converted, model)
    model.load_state_dict(converted, strict=True)
    return model, converted, depth
