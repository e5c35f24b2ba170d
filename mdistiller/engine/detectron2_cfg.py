"""Upstream's detectron2-style detection YAML files (mdistiller `detection/configs/`) read into our config keys.

`tools/train.py --cfg detection/configs/DKD/DKD-R18-R101.yaml` trains the same recipe as our
`configs/coco/DKD-R18-R101.yaml`: `merge_file` sends a file `is_detectron2_config` recognises through
`translate_detectron2_config`, which returns a nested dict of OUR keys, merged like any config file.

Reading follows detectron2: `_BASE_` (relative to the file's folder) is read first and the file overrides it key by
key (nested mappings merged, anything else replaced); strings are Python literals where they parse as one
(`("coco_2017_train",)`, `1e-4`), as yacs reads them. Every key the chain sets is accounted for, none is ignored:

- a key with an equivalent of ours maps to it (`MAPPED` below, e.g. SOLVER.IMS_PER_BATCH -> SOLVER.BATCH_SIZE);
- a key whose value is exactly what our detector builds anyway is accepted (`_fixed`: anchors, RPN/ROI settings,
  input normalisation per backbone, ...). These are also checked when the file does NOT set them, against
  detectron2's default (the defaults upstream's `model/config.py` copies for its teacher), since that default is what
  upstream would build: e.g. a file leaving POST_NMS_TOPK_TRAIN at detectron2's 2000 is refused;
- anything else, or a fixed key with another value, is an MdistillerError naming the key, its value, the file that
  set it and why.

The mapped keys are always written (from the file, else detectron2's / upstream's default), so the translated dict
holds the whole recipe whatever our own defaults are. Decisions:
- MODEL.WEIGHTS (upstream's `pretrained/<pair>.pth`, the ReviewKD release bundle of the detectron2 zoo teacher under
  `teacher.*` and the ImageNet student backbone) -> both DISTILLER.TEACHER_CKPT and DETECTION.STUDENT_WEIGHTS, the
  same file, path kept as written (upstream resolves it from its working directory).
- KD.TYPE absent means upstream's default "DKD"; "NONE" (our baseline, RCNN_NONE) is ours: upstream raises for it.
- OUTPUT_DIR -> EXPERIMENT.NAME (its last folder), EXPERIMENT.PROJECT "coco"; DATASET.TYPE "coco", ROOT "data/coco"
  (detectron2's datasets/coco layout), DATASET.TEST.BATCH_SIZE 1 (detectron2 evaluates one image per GPU step).
- DETECTION.TEACHER_FLIP_BEFORE_NORMALIZE False: upstream's teacher normalisation (detection.md 1.5).
- MODEL.MASK_ON True is refused: Mask R-CNN students are not built. Command-line overrides in detectron2's form are
  not read (ours are: `KEY VALUE` after the file).
"""

from __future__ import annotations

import ast
import os
from typing import Any, Callable

import yaml

from ..errors import MdistillerError

SPEC = "detection.md"

# top-level keys of detectron2's config (plus upstream's TEACHER / KD) that are no section of ours
_D2_TOP = ("MODEL", "INPUT", "DATASETS", "DATALOADER", "TEST", "TEACHER", "OUTPUT_DIR", "VERSION", "SEED",
           "CUDNN_BENCHMARK", "VIS_PERIOD", "GLOBAL")
_D2_SOLVER_ONLY = ("IMS_PER_BATCH", "BASE_LR", "STEPS", "GAMMA", "WARMUP_METHOD", "LR_SCHEDULER_NAME", "NESTEROV",
                   "BIAS_LR_FACTOR", "WEIGHT_DECAY_BIAS", "CLIP_GRADIENTS", "REFERENCE_WORLD_SIZE")
_D2_KD_ONLY = ("TYPE", "DKD", "REVIEWKD")  # upstream's KD section; ours (the KD method) has TEMPERATURE and LOSS
# SOLVER keys both detectron2 and we have: they tell nothing
_SHARED_SOLVER = ("MAX_ITER", "MOMENTUM", "WEIGHT_DECAY", "WEIGHT_DECAY_NORM", "WARMUP_ITERS", "WARMUP_FACTOR",
                  "CHECKPOINT_PERIOD", "AMP")

STUDENT_BACKBONES = {"build_resnet_fpn_backbone_kd": "ResNet", "build_mobilenetv2_fpn_backbone": "MV2"}
STUDENT_DEPTHS = {18: "R18", 50: "R50"}
TEACHER_DEPTHS = {101: "R101", 50: "R50"}
KD_TYPES = {"NONE": "RCNN_NONE", "DKD": "RCNN_DKD", "ReviewKD": "RCNN_REVIEWKD", "ReviewDKD": "RCNN_REVIEWDKD"}
SPLITS = {"coco_2017_train": "train2017", "coco_2017_val": "val2017"}

# detectron2's defaults of the keys translated or checked here (as copied for the teacher in upstream's
# model/config.py, detectron2 of April 2022), and upstream's own additions (KD.*, MODEL.MOBILENETV2.*)
D2_DEFAULTS: dict[str, Any] = {
    "SOLVER.IMS_PER_BATCH": 16, "SOLVER.BASE_LR": 0.001, "SOLVER.MAX_ITER": 40000, "SOLVER.STEPS": [30000],
    "SOLVER.GAMMA": 0.1, "SOLVER.MOMENTUM": 0.9, "SOLVER.WEIGHT_DECAY": 0.0001, "SOLVER.WEIGHT_DECAY_NORM": 0.0,
    "SOLVER.WARMUP_FACTOR": 0.001, "SOLVER.WARMUP_ITERS": 1000, "SOLVER.CHECKPOINT_PERIOD": 5000,
    "TEST.EVAL_PERIOD": 0, "DATALOADER.NUM_WORKERS": 4,
    "INPUT.MIN_SIZE_TRAIN": [800], "INPUT.MAX_SIZE_TRAIN": 1333, "INPUT.MIN_SIZE_TEST": 800,
    "INPUT.MAX_SIZE_TEST": 1333,
    "DATASETS.TRAIN": [], "DATASETS.TEST": [], "OUTPUT_DIR": "./output",
    "MODEL.WEIGHTS": "", "MODEL.MASK_ON": False, "MODEL.RESNETS.DEPTH": 50, "TEACHER.MODEL.RESNETS.DEPTH": 50,
    "MODEL.BACKBONE.NAME": "build_resnet_backbone",
    "KD.TYPE": "DKD", "KD.DKD.ALPHA": 1.0, "KD.DKD.BETA": 0.25, "KD.DKD.T": 1.0, "KD.REVIEWKD.LOSS_WEIGHT": 1.0,
}

_RES_FEATURES = ["res2", "res3", "res4", "res5"]
_MV2_FEATURES = ["m2", "m3", "m4", "m5"]


class _Fixed:
    """A key accepted only at the value our detector builds: `expect(arch)` gives it; `needed(arch)` False means the
    value is unused for that backbone, so only a value the file sets is checked."""

    def __init__(self, default: Any, expect: Any, needed: Callable[[str], bool] | None = None, why: str = ""):
        self.default = default
        self.expect = expect if callable(expect) else (lambda arch, value=expect: value)
        self.needed = needed or (lambda arch: True)
        self.why = why


def _model_keys(student: bool) -> dict[str, _Fixed]:
    """The fixed keys under MODEL (student) or TEACHER.MODEL (teacher): detection.md 1.5-1.7."""
    def resnet(arch: str) -> bool:
        return arch != "MV2"

    keys = {
        "META_ARCHITECTURE": _Fixed("GeneralizedRCNN", "RCNNKD" if student else "GeneralizedRCNN",
                                    why="upstream's distillation detector" if student else "the plain teacher"),
        "BACKBONE.FREEZE_AT": _Fixed(2, lambda arch: _detector()["FREEZE_AT"][arch], why="our per-backbone value"),
        "RESNETS.OUT_FEATURES": _Fixed(["res4"], _RES_FEATURES, resnet),
        "RESNETS.RES2_OUT_CHANNELS": _Fixed(256, lambda arch: 64 if arch == "R18" else 256, resnet),
        "RESNETS.STRIDE_IN_1X1": _Fixed(True, True), "RESNETS.NORM": _Fixed("FrozenBN", "FrozenBN"),
        "RESNETS.NUM_GROUPS": _Fixed(1, 1), "RESNETS.WIDTH_PER_GROUP": _Fixed(64, 64),
        "RESNETS.STEM_OUT_CHANNELS": _Fixed(64, 64), "RESNETS.RES5_DILATION": _Fixed(1, 1),
        "FPN.IN_FEATURES": _Fixed([], lambda arch: _MV2_FEATURES if arch == "MV2" else _RES_FEATURES),
        "FPN.OUT_CHANNELS": _Fixed(256, 256), "FPN.NORM": _Fixed("", ""), "FPN.FUSE_TYPE": _Fixed("sum", "sum"),
        "ANCHOR_GENERATOR.NAME": _Fixed("DefaultAnchorGenerator", "DefaultAnchorGenerator"),
        "ANCHOR_GENERATOR.SIZES": _Fixed([[32, 64, 128, 256, 512]], [[32], [64], [128], [256], [512]]),
        "ANCHOR_GENERATOR.ASPECT_RATIOS": _Fixed([[0.5, 1.0, 2.0]], [[0.5, 1.0, 2.0]]),
        "ANCHOR_GENERATOR.OFFSET": _Fixed(0.0, 0.0),
        "PROPOSAL_GENERATOR.NAME": _Fixed("RPN", "RPN"), "PROPOSAL_GENERATOR.MIN_SIZE": _Fixed(0, 0),
        "RPN.HEAD_NAME": _Fixed("StandardRPNHead", "StandardRPNHead"),
        "RPN.IN_FEATURES": _Fixed(["res4"], ["p2", "p3", "p4", "p5", "p6"]),
        "RPN.PRE_NMS_TOPK_TRAIN": _Fixed(12000, 2000), "RPN.PRE_NMS_TOPK_TEST": _Fixed(6000, 1000),
        "RPN.POST_NMS_TOPK_TRAIN": _Fixed(2000, 1000), "RPN.POST_NMS_TOPK_TEST": _Fixed(1000, 1000),
        "RPN.NMS_THRESH": _Fixed(0.7, 0.7), "RPN.IOU_THRESHOLDS": _Fixed([0.3, 0.7], [0.3, 0.7]),
        "RPN.IOU_LABELS": _Fixed([0, -1, 1], [0, -1, 1]), "RPN.BATCH_SIZE_PER_IMAGE": _Fixed(256, 256),
        "RPN.POSITIVE_FRACTION": _Fixed(0.5, 0.5), "RPN.SMOOTH_L1_BETA": _Fixed(0.0, 0.0),
        "RPN.BBOX_REG_LOSS_TYPE": _Fixed("smooth_l1", "smooth_l1"),
        "RPN.BBOX_REG_WEIGHTS": _Fixed([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]),
        "RPN.BOUNDARY_THRESH": _Fixed(-1, -1), "RPN.LOSS_WEIGHT": _Fixed(1.0, 1.0),
        "RPN.BBOX_REG_LOSS_WEIGHT": _Fixed(1.0, 1.0), "RPN.CONV_DIMS": _Fixed([-1], [-1]),
        "ROI_HEADS.NAME": _Fixed("Res5ROIHeads", "StandardROIHeads"),
        "ROI_HEADS.IN_FEATURES": _Fixed(["res4"], ["p2", "p3", "p4", "p5"]),
        "ROI_HEADS.NUM_CLASSES": _Fixed(80, 80), "ROI_HEADS.IOU_THRESHOLDS": _Fixed([0.5], [0.5]),
        "ROI_HEADS.IOU_LABELS": _Fixed([0, 1], [0, 1]), "ROI_HEADS.BATCH_SIZE_PER_IMAGE": _Fixed(512, 512),
        "ROI_HEADS.POSITIVE_FRACTION": _Fixed(0.25, 0.25), "ROI_HEADS.SCORE_THRESH_TEST": _Fixed(0.05, 0.05),
        "ROI_HEADS.NMS_THRESH_TEST": _Fixed(0.5, 0.5), "ROI_HEADS.PROPOSAL_APPEND_GT": _Fixed(True, True),
        "ROI_BOX_HEAD.NAME": _Fixed("", "FastRCNNConvFCHead"), "ROI_BOX_HEAD.NUM_FC": _Fixed(0, 2),
        "ROI_BOX_HEAD.POOLER_RESOLUTION": _Fixed(14, 7), "ROI_BOX_HEAD.FC_DIM": _Fixed(1024, 1024),
        "ROI_BOX_HEAD.NUM_CONV": _Fixed(0, 0), "ROI_BOX_HEAD.POOLER_TYPE": _Fixed("ROIAlignV2", "ROIAlignV2"),
        "ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": _Fixed(0, 0), "ROI_BOX_HEAD.SMOOTH_L1_BETA": _Fixed(0.0, 0.0),
        "ROI_BOX_HEAD.BBOX_REG_WEIGHTS": _Fixed([10.0, 10.0, 5.0, 5.0], [10.0, 10.0, 5.0, 5.0]),
        "ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE": _Fixed("smooth_l1", "smooth_l1"),
        "ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG": _Fixed(False, False), "ROI_BOX_HEAD.NORM": _Fixed("", ""),
        # the mask head is built only with MASK_ON (refused): upstream's Base values are accepted, unused
        "ROI_MASK_HEAD.NAME": _Fixed("MaskRCNNConvUpsampleHead", "MaskRCNNConvUpsampleHead", lambda arch: False),
        "ROI_MASK_HEAD.NUM_CONV": _Fixed(0, 4, lambda arch: False),
        "ROI_MASK_HEAD.POOLER_RESOLUTION": _Fixed(14, 14, lambda arch: False),
        "KEYPOINT_ON": _Fixed(False, False), "LOAD_PROPOSALS": _Fixed(False, False),
        "PIXEL_MEAN": _Fixed([103.530, 116.280, 123.675], lambda arch: list(_detector()["INPUTS"][arch]["pixel_mean"]),
                             why="our per-backbone normalisation (detector.INPUTS)"),
        "PIXEL_STD": _Fixed([1.0, 1.0, 1.0], lambda arch: list(_detector()["INPUTS"][arch]["pixel_std"]),
                            why="our per-backbone normalisation (detector.INPUTS)"),
    }
    if student:
        keys["MOBILENETV2.OUT_FEATURES"] = _Fixed(["m2"], _MV2_FEATURES, lambda arch: arch == "MV2")
        keys["MOBILENETV2.NORM"] = _Fixed("FrozenBN", "FrozenBN")
    else:
        keys["BACKBONE.NAME"] = _Fixed("build_resnet_backbone", "build_resnet_fpn_backbone",
                                       why="the teacher is a detectron2 ResNet-FPN")
        keys["MASK_ON"] = _Fixed(False, False, why="the teacher's mask head is never used (detection.md 1.5)")
        keys["WEIGHTS"] = _Fixed("", "", why="upstream loads the teacher from MODEL.WEIGHTS (teacher.* keys)")
    return keys


FIXED: dict[str, _Fixed] = {
    **{"MODEL." + key: fixed for key, fixed in _model_keys(student=True).items()},
    **{"TEACHER.MODEL." + key: fixed for key, fixed in _model_keys(student=False).items()},
    "INPUT.FORMAT": _Fixed("BGR", lambda arch: _detector()["INPUTS"][arch]["format"],
                           why="our per-backbone input format (detector.INPUTS)"),
    "TEACHER.INPUT.FORMAT": _Fixed("BGR", "BGR", why="the detectron2 zoo teachers read BGR"),
    "INPUT.MIN_SIZE_TRAIN_SAMPLING": _Fixed("choice", "choice"),
    "INPUT.RANDOM_FLIP": _Fixed("horizontal", "horizontal"), "INPUT.CROP.ENABLED": _Fixed(False, False),
    "INPUT.MASK_FORMAT": _Fixed("polygon", "polygon"),
    "DATALOADER.ASPECT_RATIO_GROUPING": _Fixed(True, True), "DATALOADER.FILTER_EMPTY_ANNOTATIONS": _Fixed(True, True),
    "DATALOADER.SAMPLER_TRAIN": _Fixed("TrainingSampler", "TrainingSampler"),
    "DATALOADER.REPEAT_THRESHOLD": _Fixed(0.0, 0.0),
    "SOLVER.LR_SCHEDULER_NAME": _Fixed("WarmupMultiStepLR", "WarmupMultiStepLR"),
    "SOLVER.WARMUP_METHOD": _Fixed("linear", "linear"), "SOLVER.NESTEROV": _Fixed(False, False),
    "SOLVER.BIAS_LR_FACTOR": _Fixed(1.0, 1.0), "SOLVER.CLIP_GRADIENTS.ENABLED": _Fixed(False, False),
    "SOLVER.AMP.ENABLED": _Fixed(False, False, why="upstream's recipe is fp32 (our SOLVER.AMP is bf16)"),
    "SOLVER.REFERENCE_WORLD_SIZE": _Fixed(0, 0, why="SOLVER.BATCH_SIZE is the global batch"),
    "TEST.DETECTIONS_PER_IMAGE": _Fixed(100, 100), "TEST.AUG.ENABLED": _Fixed(False, False),
    "TEST.PRECISE_BN.ENABLED": _Fixed(False, False), "TEST.EXPECTED_RESULTS": _Fixed([], []),
    "VIS_PERIOD": _Fixed(0, 0), "VERSION": _Fixed(2, 2, why="detectron2's config version 2"),
}

# keys with an equivalent of ours: detectron2 key -> our key (values converted in `_translate`)
MAPPED: dict[str, str] = {
    "SOLVER.IMS_PER_BATCH": "SOLVER.BATCH_SIZE", "SOLVER.BASE_LR": "SOLVER.LR", "SOLVER.MAX_ITER": "SOLVER.MAX_ITER",
    "SOLVER.STEPS": "SOLVER.LR_DECAY_ITERS", "SOLVER.GAMMA": "SOLVER.LR_DECAY_RATE",
    "SOLVER.MOMENTUM": "SOLVER.MOMENTUM", "SOLVER.WEIGHT_DECAY": "SOLVER.WEIGHT_DECAY",
    "SOLVER.WEIGHT_DECAY_NORM": "SOLVER.WEIGHT_DECAY_NORM", "SOLVER.WARMUP_ITERS": "SOLVER.WARMUP_ITERS",
    "SOLVER.WARMUP_FACTOR": "SOLVER.WARMUP_FACTOR", "SOLVER.CHECKPOINT_PERIOD": "SOLVER.CHECKPOINT_PERIOD",
    "TEST.EVAL_PERIOD": "SOLVER.EVAL_PERIOD", "DATALOADER.NUM_WORKERS": "DATASET.NUM_WORKERS",
    "INPUT.MIN_SIZE_TRAIN": "DETECTION.MIN_SIZE_TRAIN", "INPUT.MAX_SIZE_TRAIN": "DETECTION.MAX_SIZE_TRAIN",
    "INPUT.MIN_SIZE_TEST": "DETECTION.MIN_SIZE_TEST", "INPUT.MAX_SIZE_TEST": "DETECTION.MAX_SIZE_TEST",
    "DATASETS.TRAIN": "DETECTION.TRAIN_SPLIT", "DATASETS.TEST": "DETECTION.TEST_SPLIT",
    "MODEL.MASK_ON": "DETECTION.MASK_ON", "MODEL.WEIGHTS": "DISTILLER.TEACHER_CKPT",
    "OUTPUT_DIR": "EXPERIMENT.NAME", "KD.TYPE": "DISTILLER.TYPE",
    "KD.DKD.ALPHA": "RCNN_DKD.ALPHA", "KD.DKD.BETA": "RCNN_DKD.BETA", "KD.DKD.T": "RCNN_DKD.T",
    "KD.REVIEWKD.LOSS_WEIGHT": "RCNN_REVIEWKD.LOSS_WEIGHT",
    "MODEL.BACKBONE.NAME": "DISTILLER.STUDENT", "MODEL.RESNETS.DEPTH": "DISTILLER.STUDENT",
    "TEACHER.MODEL.RESNETS.DEPTH": "DISTILLER.TEACHER",
}


def _detector() -> dict[str, Any]:
    # imported on first use: torchvision's detection modules stay out of every classification run's start-up
    from ..detection.detector import FREEZE_AT, INPUTS

    return {"FREEZE_AT": FREEZE_AT, "INPUTS": INPUTS}


# ---- reading ----

def _read_yaml(path: str) -> dict:
    from .cfg import read_yaml_mapping  # cfg imports this module

    return read_yaml_mapping(path)


def _base_path(path: str, base: Any) -> str:
    if not isinstance(base, str) or not base:
        raise MdistillerError(f"_BASE_ in {path} must be a file path, got {base!r}")
    base = os.path.expanduser(base)
    return base if os.path.isabs(base) else os.path.normpath(os.path.join(os.path.dirname(path), base))


def _merge(into: dict, values: dict, origins: dict, path: str, prefix: str = "") -> None:
    """detectron2's merge: nested mappings merged key by key, anything else replaced; origins records which file
    set each leaf."""
    for key, value in values.items():
        full = prefix + str(key)
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, origins, path, full + ".")
            continue
        for old in [k for k in origins if k == full or k.startswith(full + ".")]:
            del origins[old]
        into[key] = value
        _record(value, origins, path, full)


def _record(value: Any, origins: dict, path: str, full: str) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _record(inner, origins, path, f"{full}.{key}")
    else:
        origins[full] = path


def load_with_base(path: str, _chain: tuple[str, ...] = ()) -> tuple[dict, dict[str, str]]:
    """The file's values merged over its `_BASE_` chain, and {dotted leaf key: the file that set it}."""
    real = os.path.realpath(path)
    if real in _chain:
        raise MdistillerError(f"_BASE_ chain of {path} loops back to itself")
    values = _read_yaml(path)
    base = values.pop("_BASE_", None)
    merged: dict = {}
    origins: dict[str, str] = {}
    if base is not None:
        merged, origins = load_with_base(_base_path(path, base), _chain + (real,))
    _merge(merged, values, origins, path)
    return merged, origins


def _decode(value: Any) -> Any:
    """yacs' reading of a YAML string ('(800,)' -> (800,), '1e-4' -> 0.0001); tuples become lists."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    if isinstance(value, (list, tuple)):
        return [_decode(v) for v in value]
    return value


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        full = prefix + str(key)
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, full + "."))
        else:
            flat[full] = _decode(value)
    return flat


# ---- recognising ----

def _section_keys(node: Any) -> set[str]:
    return {str(k) for k in node} if isinstance(node, dict) else set()


def _kind(values: dict) -> str:
    """A file's kind from its own top-level keys and their sub-keys: "ours", "detectron2" or "" (nothing telling)."""
    from .cfg import CFG

    ours = detectron2 = False
    for key, node in values.items():
        key = str(key)
        if key == "_BASE_":
            continue
        if key == "SOLVER":
            sub = _section_keys(node)
            ours |= bool(sub & set(CFG.SOLVER.keys()) - set(_SHARED_SOLVER))
            detectron2 |= bool(sub & set(_D2_SOLVER_ONLY))
        elif key == "KD":
            sub = _section_keys(node)
            ours |= bool(sub & set(CFG.KD.keys()))
            detectron2 |= bool(sub & set(_D2_KD_ONLY))
        elif key in CFG:
            ours = True
        elif key in _D2_TOP:
            detectron2 = True
    if ours:
        return "ours"
    return "detectron2" if detectron2 else ""


def is_detectron2_config(path: str) -> bool:
    """Whether a YAML file is detectron2-style (MODEL / INPUT / DATASETS / TEACHER / KD.TYPE / SOLVER.IMS_PER_BATCH
    ...) rather than ours (EXPERIMENT / DATASET / DISTILLER / SOLVER.BATCH_SIZE ...). A file with keys of ours is
    ours, whatever else it holds (its unknown keys are then named by the ordinary merge); one with neither is decided
    by its `_BASE_`. A file that cannot be read is not detectron2's (the ordinary loading reports it)."""
    seen: set[str] = set()
    while True:
        real = os.path.realpath(path)
        if real in seen or not os.path.isfile(path):
            return False
        seen.add(real)
        try:
            with open(path) as f:
                values = yaml.safe_load(f)
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            return False
        if not isinstance(values, dict):
            return False
        kind = _kind(values)
        if kind:
            return kind == "detectron2"
        base = values.get("_BASE_")
        if not isinstance(base, str) or not base:
            return False
        path = _base_path(path, base)


# ---- translating ----

def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return type(a) is type(b) and a == b


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value) if value == "" or " " in value else value
    return repr(value)


class _Refuse:
    def __init__(self, origins: dict[str, str], top: str):
        self.origins = origins
        self.top = top

    def __call__(self, key: str, value: Any, why: str, set_in_file: bool = True) -> MdistillerError:
        where = (f"in {self.origins.get(key, self.top)}" if set_in_file
                 else f"(detectron2's default, not set) in {self.top}")
        return MdistillerError(f"{key} {_show(value)} {where} does not map: {why}")


def _number(refuse: _Refuse, key: str, value: Any, kind: type) -> Any:
    ok = (isinstance(value, int) if kind is int else isinstance(value, (int, float))) and not isinstance(value, bool)
    if not ok or value < 0:
        raise refuse(key, value, f"expects a non-negative {kind.__name__}")
    return kind(value)


def _sizes(refuse: _Refuse, key: str, value: Any) -> list[int]:
    sizes = value if isinstance(value, list) else [value]
    if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise refuse(key, value, "expects positive integer sizes")
    return sizes


def _split(refuse: _Refuse, key: str, value: Any, set_in_file: bool) -> str:
    names = value if isinstance(value, list) else [value]
    if len(names) != 1 or names[0] not in SPLITS:
        raise refuse(key, value, f"our COCO reader takes one of {', '.join(SPLITS)} (DETECTION.TRAIN_SPLIT / "
                                 "TEST_SPLIT)", set_in_file)
    return SPLITS[names[0]]


def translate_detectron2_config(path: str) -> dict:
    """A detectron2-style detection config (with its `_BASE_` chain) as a nested dict of our keys; MdistillerError
    naming the first key that does not map."""
    merged, origins = load_with_base(path)
    flat = _flatten(merged)
    refuse = _Refuse(origins, path)

    def get(key: str) -> Any:
        return flat[key] if key in flat else D2_DEFAULTS[key]

    # identities first: the fixed values depend on the backbones
    backbone = get("MODEL.BACKBONE.NAME")
    if backbone not in STUDENT_BACKBONES:
        raise refuse("MODEL.BACKBONE.NAME", backbone, f"our students are {', '.join(STUDENT_BACKBONES)}",
                     "MODEL.BACKBONE.NAME" in flat)
    if STUDENT_BACKBONES[backbone] == "MV2":
        if "MODEL.RESNETS.DEPTH" in flat:
            raise refuse("MODEL.RESNETS.DEPTH", flat["MODEL.RESNETS.DEPTH"], "upstream's MV2 student has no depth")
        student = "MV2"
    else:
        depth = get("MODEL.RESNETS.DEPTH")
        if depth not in STUDENT_DEPTHS or isinstance(depth, bool):
            raise refuse("MODEL.RESNETS.DEPTH", depth, "our ResNet students are R18-FPN and R50-FPN",
                         "MODEL.RESNETS.DEPTH" in flat)
        student = STUDENT_DEPTHS[depth]
    teacher_depth = get("TEACHER.MODEL.RESNETS.DEPTH")
    if teacher_depth not in TEACHER_DEPTHS or isinstance(teacher_depth, bool):
        raise refuse("TEACHER.MODEL.RESNETS.DEPTH", teacher_depth, "our teachers are R101-FPN and R50-FPN",
                     "TEACHER.MODEL.RESNETS.DEPTH" in flat)
    teacher = TEACHER_DEPTHS[teacher_depth]
    mask_on = get("MODEL.MASK_ON")
    if mask_on is not False:
        raise refuse("MODEL.MASK_ON", mask_on, "Mask R-CNN students are not built (DETECTION.MASK_ON True is refused)")
    kd_type = get("KD.TYPE")
    if kd_type not in KD_TYPES:
        raise refuse("KD.TYPE", kd_type, f"our detection methods take {', '.join(KD_TYPES)}")
    method = KD_TYPES[kd_type]

    for key, value in flat.items():  # every key the chain sets, in order
        if key in MAPPED:
            continue
        fixed = FIXED.get(key)
        if fixed is None:
            raise refuse(key, value, "no key of ours translates it and it is not a value our detector builds anyway")
        arch = teacher if key.startswith("TEACHER.") else student
        expect = fixed.expect(arch)
        if not _same(value, expect):
            why = f" ({fixed.why})" if fixed.why else ""
            raise refuse(key, value, f"our detector uses {_show(expect)}{why} ({SPEC} 1.5-1.8)")
    for key, fixed in FIXED.items():  # the ones left at detectron2's default must be ours too
        arch = teacher if key.startswith("TEACHER.") else student
        if key not in flat and fixed.needed(arch) and not _same(fixed.default, fixed.expect(arch)):
            why = f" ({fixed.why})" if fixed.why else ""
            raise refuse(key, fixed.default, f"our detector uses {_show(fixed.expect(arch))}{why} ({SPEC} 1.5-1.8)",
                         set_in_file=False)

    output_dir = get("OUTPUT_DIR")
    if not isinstance(output_dir, str):
        raise refuse("OUTPUT_DIR", output_dir, "expects a folder path")
    weights = get("MODEL.WEIGHTS")
    if not isinstance(weights, str):
        raise refuse("MODEL.WEIGHTS", weights, "expects a file path")
    steps = get("SOLVER.STEPS")
    steps = steps if isinstance(steps, list) else [steps]

    out: dict = {
        "EXPERIMENT": {"PROJECT": "coco", "NAME": os.path.basename(os.path.normpath(output_dir))},
        # detectron2 keeps a numbered checkpoint every CHECKPOINT_PERIOD iterations: epoch_<n> after every period
        "LOG": {"SAVE_CHECKPOINT_FREQ": 1},
        "DATASET": {"TYPE": "coco", "ROOT": "data/coco", "TEST": {"BATCH_SIZE": 1},
                    "NUM_WORKERS": _number(refuse, "DATALOADER.NUM_WORKERS", get("DATALOADER.NUM_WORKERS"), int)},
        "DISTILLER": {"TYPE": method, "STUDENT": f"{student}-FPN", "TEACHER": f"{teacher}-FPN",
                      "TEACHER_CKPT": weights},
        "SOLVER": {
            "TYPE": "SGD",
            "BATCH_SIZE": _number(refuse, "SOLVER.IMS_PER_BATCH", get("SOLVER.IMS_PER_BATCH"), int),
            "LR": _number(refuse, "SOLVER.BASE_LR", get("SOLVER.BASE_LR"), float),
            "MAX_ITER": _number(refuse, "SOLVER.MAX_ITER", get("SOLVER.MAX_ITER"), int),
            "LR_DECAY_ITERS": [_number(refuse, "SOLVER.STEPS", s, int) for s in steps],
            "LR_DECAY_RATE": _number(refuse, "SOLVER.GAMMA", get("SOLVER.GAMMA"), float),
            "MOMENTUM": _number(refuse, "SOLVER.MOMENTUM", get("SOLVER.MOMENTUM"), float),
            "WEIGHT_DECAY": _number(refuse, "SOLVER.WEIGHT_DECAY", get("SOLVER.WEIGHT_DECAY"), float),
            "WEIGHT_DECAY_NORM": _number(refuse, "SOLVER.WEIGHT_DECAY_NORM", get("SOLVER.WEIGHT_DECAY_NORM"), float),
            "WARMUP_ITERS": _number(refuse, "SOLVER.WARMUP_ITERS", get("SOLVER.WARMUP_ITERS"), int),
            "WARMUP_FACTOR": _number(refuse, "SOLVER.WARMUP_FACTOR", get("SOLVER.WARMUP_FACTOR"), float),
            "CHECKPOINT_PERIOD": _number(refuse, "SOLVER.CHECKPOINT_PERIOD", get("SOLVER.CHECKPOINT_PERIOD"), int),
            "EVAL_PERIOD": _number(refuse, "TEST.EVAL_PERIOD", get("TEST.EVAL_PERIOD"), int),
        },
        "DETECTION": {
            "TRAIN_SPLIT": _split(refuse, "DATASETS.TRAIN", get("DATASETS.TRAIN"), "DATASETS.TRAIN" in flat),
            "TEST_SPLIT": _split(refuse, "DATASETS.TEST", get("DATASETS.TEST"), "DATASETS.TEST" in flat),
            "MIN_SIZE_TRAIN": _sizes(refuse, "INPUT.MIN_SIZE_TRAIN", get("INPUT.MIN_SIZE_TRAIN")),
            "MAX_SIZE_TRAIN": _number(refuse, "INPUT.MAX_SIZE_TRAIN", get("INPUT.MAX_SIZE_TRAIN"), int),
            "MIN_SIZE_TEST": _number(refuse, "INPUT.MIN_SIZE_TEST", get("INPUT.MIN_SIZE_TEST"), int),
            "MAX_SIZE_TEST": _number(refuse, "INPUT.MAX_SIZE_TEST", get("INPUT.MAX_SIZE_TEST"), int),
            "STUDENT_WEIGHTS": weights,
            "TEACHER_FLIP_BEFORE_NORMALIZE": False,
            "MASK_ON": False,
        },
    }
    if method in ("RCNN_DKD", "RCNN_REVIEWDKD") or any(k.startswith("KD.DKD.") for k in flat):
        out["RCNN_DKD"] = {name: _number(refuse, f"KD.DKD.{name}", get(f"KD.DKD.{name}"), float)
                           for name in ("ALPHA", "BETA", "T")}
    if method in ("RCNN_REVIEWKD", "RCNN_REVIEWDKD") or "KD.REVIEWKD.LOSS_WEIGHT" in flat:
        out["RCNN_REVIEWKD"] = {"LOSS_WEIGHT": _number(refuse, "KD.REVIEWKD.LOSS_WEIGHT",
                                                       get("KD.REVIEWKD.LOSS_WEIGHT"), float)}
    return out
