"""The detectors of a run, built from the config: DISTILLER.STUDENT (R18-FPN, R50-FPN, MV2-FPN) with
DETECTION.STUDENT_WEIGHTS, DISTILLER.TEACHER (R101-FPN, R50-FPN) with DISTILLER.TEACHER_CKPT (detection.md 1.5-1.6,
2, 3). Nothing is downloaded: weights come from local files.

Student backbone weights (DETECTION.STUDENT_WEIGHTS; empty: random backbone), loaded strictly into `backbone.body`:
- a torchvision ImageNet state dict (resnet18 / resnet50: conv1, bn1, layer1-4; mobilenet_v2: features.0-17; the
  classifier fc / classifier.* and MV2's 1280-channel features.18 dropped). R18 keeps upstream's input (RGB with
  its BGR-ordered mean/std, the quirk of 1.6). R50 and MV2 have no upstream recipe for torchvision weights: the
  student is switched to what those weights were trained with (RGB, ImageNet mean/std on the 0-255 scale; R50's
  stride back on the 3x3 conv), a deviation recorded in `pretrained_source`;
- upstream's bundled release `.pth` (ReviewKD's r18-r101.pth, r50-r101.pth): the names that do not start with
  `teacher.`, in detectron2's names (`backbone.bottom_up.*`), renamed with detectron2_weights' map; upstream's
  MobileNetV2 names have no map and are refused;
- MSRA's caffe2 ImageNet `R-50.pkl` (detectron2's R-50 students: BGR, std 1, stride in the 1x1 conv; spec 3.2):
  `conv1_w`, `res_conv1_bn_{s,b}`, `res{s}_{b}_branch{1,2a,2b,2c}_{w,bn_s,bn_b}`; its affine norms have no running
  statistics, so mean 0 and variance 1 are used (FrozenBN then scales by 1/sqrt(1 + 1e-5), as detectron2).
Teacher weights (DISTILLER.TEACHER_CKPT, required): a detectron2 model-zoo `.pkl`, upstream's bundled `.pth` (its
`teacher.*` weights) or a checkpoint written by tools/convert_detectron2.py (`--rgb` ones get their stem's input
channels reversed back, exact); the mask head of a Mask R-CNN teacher is dropped (upstream's teacher runs without
masks); the ResNet depth must be the configured teacher's; loaded strictly; every parameter frozen, eval mode.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np
import torch

from ..errors import MdistillerError, did_you_mean
from .detector import Detector, build_student, build_teacher
from .detectron2_weights import (
    _listing,
    check_against_model,
    convert_detectron2_state_dict,
    detectron2_to_torchvision_name,
    infer_depth,
    read_weights_file,
    select_weights,
)

DETECTION_STUDENTS = {"R18-FPN": "R18", "R50-FPN": "R50", "MV2-FPN": "MV2"}
DETECTION_TEACHERS = {"R101-FPN": "R101", "R50-FPN": "R50"}
TEACHER_DEPTHS = {"R101": 101, "R50": 50}
# what torchvision's ImageNet weights were trained on, on the 0-255 scale, RGB order (detectron2's recipe for them)
TORCHVISION_INPUT = {"format": "RGB", "pixel_mean": (123.675, 116.280, 103.530), "pixel_std": (58.395, 57.120, 57.375)}
TEACHER_HELP = ("a detectron2 model-zoo .pkl, upstream's bundled .pth or a tools/convert_detectron2.py output "
                "(nothing is downloaded; see docs/detectron2_teachers.md)")

_C2_STEM = {"conv1_w": "conv1.weight", "res_conv1_bn_s": "bn1.weight", "res_conv1_bn_b": "bn1.bias"}
_C2_BLOCK = re.compile(r"^res([2-5])_(\d+)_branch(1|2a|2b|2c)_(w|bn_s|bn_b)$")
_C2_DROPPED = re.compile(r"(_momentum$|^pred_[wb]$|^fc1000_[wb]$)")  # solver state and the ImageNet classifier


def _requires_teacher(cfg) -> bool:
    from ..distillers import distiller_dict

    cls = distiller_dict.get(str(cfg.DISTILLER.TYPE))
    return True if cls is None else bool(cls.declares.requires_teacher)


def check_detection_models(cfg, requires_teacher: bool | None = None) -> None:
    """Refuse, in one line, a student or teacher name no detection run builds (the teacher's only when the method
    distils from one: None looks DISTILLER.TYPE up), and DETECTION.MASK_ON (no Mask R-CNN student is built)."""
    student = str(cfg.DISTILLER.STUDENT)
    if student not in DETECTION_STUDENTS:
        raise MdistillerError(f"DISTILLER.STUDENT {student!r} is not a detection student"
                              f"{did_you_mean(student, DETECTION_STUDENTS)}; one of {', '.join(DETECTION_STUDENTS)}")
    if requires_teacher is None:
        requires_teacher = _requires_teacher(cfg)
    teacher = str(cfg.DISTILLER.TEACHER)
    if requires_teacher and teacher not in DETECTION_TEACHERS:
        raise MdistillerError(f"DISTILLER.TEACHER {teacher!r} is not a detection teacher"
                              f"{did_you_mean(teacher, DETECTION_TEACHERS)}; one of {', '.join(DETECTION_TEACHERS)}")
    if bool(cfg.DETECTION.MASK_ON):
        raise MdistillerError("DETECTION.MASK_ON True: Mask R-CNN students are not built; leave it False")


# ---- student ---------------------------------------------------------------------------------------------------


def _tensors(weights: Mapping[str, Any], path: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in weights.items():
        if isinstance(value, (np.ndarray, np.generic)) and np.asarray(value).dtype.kind in "biuf":
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            raise MdistillerError(f"DETECTION.STUDENT_WEIGHTS {path}: entry {name} is a {type(value).__name__}, "
                                  f"not an array")
        out[str(name)] = value
    return out


def _caffe2_body(weights: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    out, leftover = {}, []
    for name, value in weights.items():
        if _C2_DROPPED.search(name):
            continue
        if name in _C2_STEM:
            out[_C2_STEM[name]] = value
            continue
        m = _C2_BLOCK.match(name)
        if m is None:
            leftover.append(name)
            continue
        stage, block, branch, what = m.groups()
        prefix = f"layer{int(stage) - 1}.{block}."
        if branch == "1":
            out[prefix + ("downsample.0.weight" if what == "w" else f"downsample.1.{_bn_field(what)}")] = value
        else:
            j = "abc".index(branch[-1]) + 1
            out[prefix + (f"conv{j}.weight" if what == "w" else f"bn{j}.{_bn_field(what)}")] = value
    if leftover:
        raise MdistillerError(f"DETECTION.STUDENT_WEIGHTS {path}: caffe2 blobs with no ResNet name: "
                              f"{_listing(sorted(leftover))}")
    return out


def _bn_field(what: str) -> str:
    return "weight" if what == "bn_s" else "bias"


def _bundled_body(weights: dict[str, torch.Tensor], arch: str, path: str) -> dict[str, torch.Tensor]:
    student = {n: v for n, v in weights.items()
               if not n.startswith("teacher.") and n not in ("pixel_mean", "pixel_std")}
    if arch == "MV2":
        raise MdistillerError(f"DETECTION.STUDENT_WEIGHTS {path}: upstream's MobileNetV2 weights (detectron2 names) "
                              f"have no name map; give torchvision's mobilenet_v2 ImageNet state dict")
    out, unmapped, outside = {}, [], []
    for name, value in student.items():
        target = detectron2_to_torchvision_name(name)
        if target is None:
            unmapped.append(name)
        elif not target.startswith("backbone.body."):
            outside.append(name)
        else:
            out[target[len("backbone.body."):]] = value
    if unmapped:
        raise MdistillerError(f"DETECTION.STUDENT_WEIGHTS {path}: student weights with no torchvision name: "
                              f"{_listing(sorted(unmapped))}")
    if outside:
        raise MdistillerError(f"DETECTION.STUDENT_WEIGHTS {path} holds student weights outside the backbone "
                              f"({_listing(sorted(outside), 3)}): only ImageNet backbone weights are loaded")
    return out


def _use_torchvision_input(model: Detector) -> None:
    model.input_format = TORCHVISION_INPUT["format"]
    model.pixel_mean = TORCHVISION_INPUT["pixel_mean"]
    model.pixel_std = TORCHVISION_INPUT["pixel_std"]


def _stride_in_3x3_(body: torch.nn.Module) -> None:
    """torchvision's bottleneck stride placement (on the 3x3 conv) back, for torchvision's own ResNet-50 weights."""
    for name in ("layer2", "layer3", "layer4"):
        block = getattr(body, name)[0]
        block.conv1.stride, block.conv2.stride = (1, 1), (2, 2)


def load_student_weights(model: Detector, path: str) -> str:
    """Load ImageNet backbone weights (see the module docstring) strictly into `model.backbone.body`, adjusting the
    input and stride placement where the weights' format requires it; returns the description of what was loaded."""
    if not os.path.isfile(path):
        raise MdistillerError(f"DETECTION.STUDENT_WEIGHTS {path} not found (empty: a random backbone)")
    obj = read_weights_file(path)
    if not isinstance(obj, Mapping):
        raise MdistillerError(f"DETECTION.STUDENT_WEIGHTS {path} holds a {type(obj).__name__}, not a state dict")
    if isinstance(obj.get("blobs"), Mapping):
        obj = obj["blobs"]
    elif isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    elif isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    names = [str(n) for n in obj]
    arch = model.arch
    if "conv1_w" in names:
        if arch != "R50":
            raise MdistillerError(f"DETECTION.STUDENT_WEIGHTS {path} is MSRA's caffe2 ResNet; it fits R50-FPN, "
                                  f"not {arch}-FPN")
        body, source = _caffe2_body(_tensors(obj, path), path), f"MSRA caffe2 ImageNet ResNet {path}"
    elif any(n.startswith(("backbone.bottom_up.", "teacher.")) for n in names):
        body, source = _bundled_body(_tensors(obj, path), arch, path), f"upstream's bundled student backbone {path}"
    elif any(n.startswith("features.") for n in names):
        body = {n[len("features."):]: v for n, v in _tensors(obj, path).items()
                if n.startswith("features.") and not n.startswith("features.18.")}
        source = f"torchvision MobileNetV2 ImageNet weights {path} (RGB input, ImageNet mean/std: a deviation)"
    elif "conv1.weight" in names:
        body = {n: v for n, v in _tensors(obj, path).items() if not n.startswith("fc.")}
        source = f"torchvision ResNet ImageNet weights {path}"
        if arch == "R50":
            source += " (RGB input, ImageNet mean/std, stride on the 3x3 conv: a deviation from MSRA's R-50)"
    else:
        raise MdistillerError(f"DETECTION.STUDENT_WEIGHTS {path}: not a format read here (names "
                              f"{_listing(sorted(names), 3)}); give a torchvision ImageNet state dict, MSRA's "
                              f"R-50.pkl or upstream's bundled .pth")
    body = {n: v for n, v in body.items() if not n.endswith("num_batches_tracked")}
    expected = model.backbone.body.state_dict()
    if "conv1_w" in names:  # caffe2's affine norms: no running statistics
        for name in expected:
            if name.endswith((".running_mean", ".running_var")) and name not in body:
                body[name] = (torch.zeros_like if name.endswith("mean") else torch.ones_like)(expected[name])
    missing, extra = sorted(set(expected) - set(body)), sorted(set(body) - set(expected))
    if missing or extra:
        raise MdistillerError(f"DETECTION.STUDENT_WEIGHTS {path} does not fit the {arch}-FPN backbone: "
                              f"{len(missing)} missing ({_listing(missing, 3)}), {len(extra)} unexpected "
                              f"({_listing(extra, 3)})")
    wrong = [f"{n} {tuple(v.shape)} vs {tuple(expected[n].shape)}" for n, v in body.items()
             if tuple(v.shape) != tuple(expected[n].shape)]
    if wrong:
        raise MdistillerError(f"DETECTION.STUDENT_WEIGHTS {path} does not fit the {arch}-FPN backbone: "
                              f"{_listing(wrong, 3)}")
    model.backbone.body.load_state_dict(body, strict=True)
    if "torchvision" in source and arch in ("R50", "MV2"):
        _use_torchvision_input(model)
        if arch == "R50":
            _stride_in_3x3_(model.backbone.body)
    model.pretrained_source = source
    return source


def build_detection_student(cfg) -> Detector:
    """DISTILLER.STUDENT with DETECTION.STUDENT_WEIGHTS' backbone (empty: random, `pretrained_source` None)."""
    name = str(cfg.DISTILLER.STUDENT)
    if name not in DETECTION_STUDENTS:
        raise MdistillerError(f"DISTILLER.STUDENT {name!r} is not a detection student"
                              f"{did_you_mean(name, DETECTION_STUDENTS)}; one of {', '.join(DETECTION_STUDENTS)}")
    model = build_student(DETECTION_STUDENTS[name], pretrained_source=None)
    path = str(cfg.DETECTION.STUDENT_WEIGHTS)
    if path:
        load_student_weights(model, os.path.expanduser(path))
    return model


# ---- teacher ---------------------------------------------------------------------------------------------------


def teacher_weights_path(cfg) -> str:
    """DISTILLER.TEACHER_CKPT, which a distilling detection method needs (one line naming the formats otherwise)."""
    path = os.path.expanduser(str(cfg.DISTILLER.TEACHER_CKPT))
    if not path:
        raise MdistillerError(f"DISTILLER.TYPE {cfg.DISTILLER.TYPE} distils from a {cfg.DISTILLER.TEACHER} teacher: "
                              f"set DISTILLER.TEACHER_CKPT to {TEACHER_HELP}")
    if not os.path.isfile(path):
        raise MdistillerError(f"DISTILLER.TEACHER_CKPT {path} not found: give {TEACHER_HELP}")
    return path


def _torchvision_depth(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    blocks = {int(m.group(1)) for m in (re.match(r"^backbone\.body\.layer3\.(\d+)\.", n) for n in state_dict) if m}
    bottleneck = "backbone.body.layer1.0.conv3.weight" in state_dict
    return {(False, 2): 18, (False, 6): 34, (True, 6): 50, (True, 23): 101, (True, 36): 152}.get(
        (bottleneck, len(blocks)))


def load_teacher_weights(model: Detector, path: str) -> str:
    """Load a teacher checkpoint (detectron2 .pkl, upstream's bundled .pth, or our converted file) strictly into
    `model`; returns the description of what was loaded."""
    obj = read_weights_file(path)
    if not isinstance(obj, Mapping) or not isinstance(obj.get("model"), Mapping):
        raise MdistillerError(f"DISTILLER.TEACHER_CKPT {path} holds no {{'model': {{name: weights}}}}: give "
                              f"{TEACHER_HELP}")
    names = [str(n) for n in obj["model"]]
    expected_depth = TEACHER_DEPTHS[model.arch]
    if any(n.startswith("teacher.") for n in names):
        weights, kind = select_weights(obj, path, "teacher."), "upstream's bundled teacher"
    elif any(n.startswith("backbone.bottom_up.") for n in names):
        weights, kind = select_weights(obj, path), "detectron2 checkpoint"
    elif any(n.startswith("backbone.body.") for n in names):
        weights, kind = None, "converted checkpoint"
    else:
        raise MdistillerError(f"DISTILLER.TEACHER_CKPT {path}: no detector weights in a format read here (names "
                              f"{_listing(sorted(names), 3)}); give {TEACHER_HELP}")
    if weights is not None:
        depth = infer_depth(weights)
        state_dict = convert_detectron2_state_dict(weights, drop_mask_head=True)
    else:
        state_dict = {n: v for n, v in select_weights(obj, path).items()
                      if not n.startswith("roi_heads.mask_")}
        depth = _torchvision_depth(state_dict)
        fmt = obj.get("input", {}).get("format", "BGR") if isinstance(obj.get("input"), Mapping) else "BGR"
        if fmt == "RGB":  # written with --rgb: the stem takes RGB; reversed back to detectron2's BGR input
            state_dict["backbone.body.conv1.weight"] = state_dict["backbone.body.conv1.weight"].flip(1).contiguous()
    if depth is None:
        raise MdistillerError(f"DISTILLER.TEACHER_CKPT {path} holds no ResNet-FPN weights: give {TEACHER_HELP}")
    if depth != expected_depth:
        raise MdistillerError(f"DISTILLER.TEACHER_CKPT {path} holds R-{depth}-FPN weights, DISTILLER.TEACHER is "
                              f"{model.arch}-FPN (R-{expected_depth})")
    score = state_dict.get("roi_heads.box_predictor.cls_score.weight")
    if score is not None and score.shape[0] != model.roi_heads.box_predictor.cls_score.out_features:
        raise MdistillerError(f"DISTILLER.TEACHER_CKPT {path} has {score.shape[0] - 1} classes, not COCO's "
                              f"{model.roi_heads.box_predictor.cls_score.out_features - 1}")
    check_against_model(state_dict, model)
    model.load_state_dict(state_dict, strict=True)
    model.pretrained_source = f"{kind} {path}"
    return model.pretrained_source


def build_detection_teacher(cfg, random_weights: bool = False) -> Detector:
    """DISTILLER.TEACHER holding DISTILLER.TEACHER_CKPT's weights (`random_weights`: none loaded, for tests and
    timing), frozen, in eval mode."""
    name = str(cfg.DISTILLER.TEACHER)
    if name not in DETECTION_TEACHERS:
        raise MdistillerError(f"DISTILLER.TEACHER {name!r} is not a detection teacher"
                              f"{did_you_mean(name, DETECTION_TEACHERS)}; one of {', '.join(DETECTION_TEACHERS)}")
    model = build_teacher(DETECTION_TEACHERS[name], weights_source=None)
    if random_weights:
        model.pretrained_source = "random (no weights loaded)"
    else:
        load_teacher_weights(model, teacher_weights_path(cfg))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def load_detector(name: str, path: str) -> Detector:
    """The detector `name` holding `path`'s weights, in eval mode (tools/eval.py): a teacher name reads every teacher
    format (a run's R50-FPN student file is one: torchvision names); R18-FPN / MV2-FPN read a run's student file."""
    if name in DETECTION_TEACHERS:
        model = build_teacher(DETECTION_TEACHERS[name], weights_source=None)
        load_teacher_weights(model, path)
        return model.eval()
    if name not in DETECTION_STUDENTS:
        known = [*DETECTION_STUDENTS, *(t for t in DETECTION_TEACHERS if t not in DETECTION_STUDENTS)]
        raise MdistillerError(f"unknown detector {name!r}{did_you_mean(name, known)}; one of {', '.join(known)}")
    model = build_student(DETECTION_STUDENTS[name], pretrained_source=None)
    obj = read_weights_file(path)
    state_dict = obj.get("model") if isinstance(obj, Mapping) else None
    if not isinstance(state_dict, Mapping):
        raise MdistillerError(f"{path} holds no {{'model': state dict}}: give a run's student_best / student_latest")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    shapes = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if missing or extra or shapes:
        arch = obj.get("arch", "another model")
        detail = (f"{shapes[0]} is {list(state_dict[shapes[0]].shape)}, not {list(expected[shapes[0]].shape)}"
                  if shapes else f"{len(missing)} missing (e.g. {missing[0]})" if missing
                  else f"{len(extra)} unexpected (e.g. {extra[0]})")
        raise MdistillerError(f"{path} holds weights of {arch}, not {name}: {detail}")
    model.load_state_dict(state_dict, strict=True)
    model.pretrained_source = path
    return model.eval()
