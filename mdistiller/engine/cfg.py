"""The yacs defaults (mdistiller's keys, the logit-standardisation repo's and WKD's, plus ours) and config loading.

This file holds the shared sections (EXPERIMENT, DATASET, DISTILLER, SOLVER, LOG, DISTRIBUTED); each method's section
is declared in the method's module (`config_section`) and added here from the registry.

Users bring YAML files from mdistiller, the logit-standardisation repo and WKD: every key they use exists here with
mdistiller's default. Loading goes through `merge_dict` instead of yacs' own merge so that an unknown key is named
with the closest valid one, and an int is accepted where a float is expected (`KD.TEMPERATURE: 1`).
"""

from __future__ import annotations

import ast
import copy
import os
from typing import Any, Iterable

import yaml
from yacs.config import CfgNode as CN

from .. import detection  # noqa: F401  (registers DATASET.TYPE coco and the RCNN_* methods' sections first)
from ..distillers import method_sections
from ..distillers.config import check_choices, to_cfgnode
from ..errors import MdistillerError, closest, did_you_mean
from ..files import DEFAULT_DATA_ROOT, atomic_write_text
from .detectron2_cfg import is_detectron2_config, translate_detectron2_config

# Allowed values of the keys that take one of a few names.
OPTIMIZERS = ("SGD", "AdamW")  # SOLVER.TYPE
LR_SCHEDULES = ("step", "cosine")  # SOLVER.LR_SCHEDULE
NAN_POLICIES = ("stop", "skip")  # SOLVER.NAN_POLICY
TEACHER_CACHE_DTYPES = ("fp32", "fp16")  # DISTILLER.TEACHER_CACHE_DTYPE
COMPILE_MODES = ("", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # SOLVER.COMPILE
# SOLVER.TRAINER: the names of upstream's trainer classes. Ours is one trainer; a distiller declares which of these
# names describe how it trains (Declaration.upstream_trainers), and "dot" / "crd_dot" select DOT's update rule
# (see engine/validate.py).
TRAINERS = ("base", "ours", "aug", "crd", "dot", "crd_dot")

CFG = CN()

# Experiment
CFG.EXPERIMENT = CN()
CFG.EXPERIMENT.PROJECT = "distill"
CFG.EXPERIMENT.NAME = ""
CFG.EXPERIMENT.TAG = "default"
CFG.EXPERIMENT.SEED = 0
CFG.EXPERIMENT.LOGIT_STAND = False
CFG.EXPERIMENT.BASE_TEMP = 0.0  # --base-temp, recorded when --logit-stand set it (0: not set by the flags)
CFG.EXPERIMENT.KD_WEIGHT = 0.0  # --kd-weight, likewise
CFG.EXPERIMENT.DETERMINISTIC = False  # ours: deterministic algorithms, cudnn.deterministic, no cudnn.benchmark

# Dataset
CFG.DATASET = CN()
CFG.DATASET.TYPE = "cifar100"
CFG.DATASET.ROOT = DEFAULT_DATA_ROOT
CFG.DATASET.DOWNLOAD = True  # CIFAR: fetch a missing folder into ROOT (as upstream; ImageNet never is)
CFG.DATASET.NUM_WORKERS = 2
CFG.DATASET.NUM_CLASSES = 0  # 0: taken from the data set; otherwise must agree with it
CFG.DATASET.DEVICE_RESIDENT = True  # CIFAR on CUDA: keep the data on the GPU and augment there (no workers)
CFG.DATASET.IMAGE_SIZE = 224  # ImageNet: RandomResizedCrop size for training, CenterCrop size for testing
CFG.DATASET.SKIP_BAD_IMAGES = False  # ImageNet: an unreadable image stops the run (False) or is skipped and counted
CFG.DATASET.GPU_DECODE = False  # ImageNet on CUDA, standard view: decode the training JPEGs on the GPU, batched
# ours: a training view that replaces the methods' "standard" one ("" keeps it; "deit": timm's DeiT augmentation)
CFG.DATASET.AUGMENT = ""
# ours: Mixup / CutMix / label smoothing on training batches (timm's, the DeiT recipe); 0 everywhere: off
CFG.DATASET.MIXUP = CN()
CFG.DATASET.MIXUP.MIXUP_ALPHA = 0.0
CFG.DATASET.MIXUP.CUTMIX_ALPHA = 0.0
CFG.DATASET.MIXUP.PROB = 1.0
CFG.DATASET.MIXUP.SWITCH_PROB = 0.5
CFG.DATASET.MIXUP.LABEL_SMOOTHING = 0.0
CFG.DATASET.TEST = CN()
CFG.DATASET.TEST.BATCH_SIZE = 64
# the CAT-KD repo's training-set reduction experiments (keep RESERVED_CLASS_NUM classes, RESERVED_RATE of each):
# not implemented, so REDUCTION True is refused; the other two are read only with it
CFG.DATASET.REDUCTION = False
CFG.DATASET.RESERVED_RATE = 1.0
CFG.DATASET.RESERVED_CLASS_NUM = 100

# Distiller
CFG.DISTILLER = CN()
CFG.DISTILLER.TYPE = "NONE"  # vanilla training
CFG.DISTILLER.TEACHER = "ResNet50"
CFG.DISTILLER.STUDENT = "resnet32"
CFG.DISTILLER.TEACHER_CKPT = ""  # overrides the zoo's teacher path when non-empty
# ours: the teacher's logits read from a table of every CIFAR training view instead of running the teacher
# ("" off | a cache folder | "auto": this teacher's and data's cache, built first if missing); docs/teacher_cache.md
CFG.DISTILLER.TEACHER_CACHE = ""
CFG.DISTILLER.TEACHER_CACHE_DTYPE = "fp32"  # ours: the cache's storage, "fp32" | "fp16"

# Solver
CFG.SOLVER = CN()
CFG.SOLVER.TRAINER = "base"
# the GLOBAL batch: under torchrun each of the N processes trains on BATCH_SIZE / N of it (N must divide it)
CFG.SOLVER.BATCH_SIZE = 64
CFG.SOLVER.EPOCHS = 240
CFG.SOLVER.LR = 0.05
CFG.SOLVER.LR_DECAY_STAGES = [150, 180, 210]
CFG.SOLVER.LR_DECAY_RATE = 0.1
CFG.SOLVER.WEIGHT_DECAY = 0.0001
CFG.SOLVER.MOMENTUM = 0.9
CFG.SOLVER.NAN_POLICY = "stop"  # ours: "stop" | "skip" a step whose loss is not finite
CFG.SOLVER.TYPE = "SGD"
# ours: linear per-step warm-up of the LR over the first N epochs (0: none, mdistiller's recipe); large-batch mode
CFG.SOLVER.LR_WARMUP_EPOCHS = 0.0
# ours: "step" (mdistiller's LR_DECAY_STAGES x LR_DECAY_RATE) or "cosine" to LR_MIN, per step (DeiT / VkD)
CFG.SOLVER.LR_SCHEDULE = "step"
CFG.SOLVER.LR_MIN = 0.0
# ours, speed switches (off = the published fp32 recipe; see README "Speed"): bf16 autocast with losses in fp32,
# channels_last tensors, and torch.compile of the distiller's forward ("" off, or a torch.compile mode)
CFG.SOLVER.AMP = False
CFG.SOLVER.CHANNELS_LAST = False
CFG.SOLVER.COMPILE = ""
CFG.SOLVER.DOT = CN()
CFG.SOLVER.DOT.DELTA = 0.075
# AdamW (SOLVER.TYPE "AdamW", built by mdistiller.engine.optim.build_optimizer): the DeiT / VkD recipe.
CFG.SOLVER.ADAMW = CN()
CFG.SOLVER.ADAMW.BETAS = (0.9, 0.999)
CFG.SOLVER.ADAMW.EPS = 1e-8
CFG.SOLVER.ADAMW.NO_WEIGHT_DECAY_1D = True  # biases, norms, 1-d params and no_weight_decay() names: no decay
# SGD: the weight decay of norm-layer parameters (detectron2's SOLVER.WEIGHT_DECAY_NORM, 0.0 in its recipes); < 0: the
# same as WEIGHT_DECAY (mdistiller's single param group)
CFG.SOLVER.WEIGHT_DECAY_NORM = -1.0
# ours: detectron2's iteration schedule (the detection task), instead of SOLVER.EPOCHS when MAX_ITER > 0: the LR is
# LR x LR_DECAY_RATE^(number of LR_DECAY_ITERS <= iteration), times a linear warm-up from WARMUP_FACTOR over the first
# WARMUP_ITERS iterations; the run is cut into periods of CHECKPOINT_PERIOD iterations (each ends like an epoch: latest
# saved, the worklog written) and evaluated every EVAL_PERIOD iterations (0: at the end only)
CFG.SOLVER.MAX_ITER = 0
CFG.SOLVER.LR_DECAY_ITERS = []
CFG.SOLVER.WARMUP_ITERS = 0
CFG.SOLVER.WARMUP_FACTOR = 0.001
CFG.SOLVER.CHECKPOINT_PERIOD = 5000
CFG.SOLVER.EVAL_PERIOD = 0

# ours: the detection task (DATASET.TYPE coco; docs/detection.md). DATASET.ROOT holds annotations/instances_<split>.json
# and the image folder <split>/ (detectron2's datasets/coco layout)
CFG.DETECTION = CN()
CFG.DETECTION.TRAIN_SPLIT = "train2017"
CFG.DETECTION.TEST_SPLIT = "val2017"
# detectron2's INPUT.*: the shortest edge (one drawn per training image) and the longest edge's limit
CFG.DETECTION.MIN_SIZE_TRAIN = (640, 672, 704, 736, 768, 800)
CFG.DETECTION.MAX_SIZE_TRAIN = 1333
CFG.DETECTION.MIN_SIZE_TEST = 800
CFG.DETECTION.MAX_SIZE_TEST = 1333
CFG.DETECTION.STUDENT_WEIGHTS = ""  # the student backbone's ImageNet weights ("": random, as no file is downloaded)
# the R18 pairs' teacher input: upstream normalises in the student's RGB order, then flips to BGR (R and B means
# swapped, detection.md 1.5); True flips first, as the teacher was trained
CFG.DETECTION.TEACHER_FLIP_BEFORE_NORMALIZE = False
CFG.DETECTION.MASK_ON = False  # Mask R-CNN students: not built, True is refused

# Log
CFG.LOG = CN()
CFG.LOG.TENSORBOARD_FREQ = 500
CFG.LOG.SAVE_CHECKPOINT_FREQ = 40
CFG.LOG.PREFIX = "./output"
CFG.LOG.RESULTS_DIR = "./logs"  # one result file per finished run, named like the logit-standardisation repo's
CFG.LOG.WANDB = False

# ours: DistributedDataParallel under torchrun (ignored in a one-process run)
CFG.DISTRIBUTED = CN()
CFG.DISTRIBUTED.SYNC_BN = False  # the student's (and extra modules') BatchNorm over the global batch; needs CUDA
CFG.DISTRIBUTED.FIND_UNUSED_PARAMETERS = False  # for a distiller whose forward leaves a learnable parameter unused

# ---- Distillation methods: each method module declares its own section (distillers/config.py) ----
for _name, _spec in method_sections().items():
    if _name in CFG:
        raise ValueError(f"method config section {_name} collides with a shared section")
    CFG[_name] = to_cfgnode(_spec)


def default_cfg() -> CN:
    """A fresh, mutable copy of the defaults."""
    return CFG.clone()


def _all_keys(node: CN, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        full = prefix + key
        keys.append(full)
        if isinstance(value, CN):
            keys.extend(_all_keys(value, full + "."))
    return keys


def _unknown_key_error(full_key: str, root: CN, source: str) -> MdistillerError:
    candidates = _all_keys(root)
    hint = did_you_mean(full_key, candidates, 0.6)
    if not hint:  # a typo in the leaf name is the common case: compare leaf names too
        leaves = {c.rsplit(".", 1)[-1]: c for c in candidates}
        leaf = closest(full_key.rsplit(".", 1)[-1], leaves, 0.6)
        hint = f" (did you mean {leaves[leaf]}?)" if leaf else ""
    return MdistillerError(f"unknown config key {full_key} in {source}{hint}")


def _decode(value: Any) -> Any:
    """Strings become Python literals where they parse as one, as yacs does ('(32, 32)' -> (32, 32))."""
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def _coerce(value: Any, default: Any, full_key: str, source: str) -> Any:
    if default is None or value is None or type(value) is type(default):
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    if isinstance(default, str) and not isinstance(value, (CN, dict)):
        return str(value)  # e.g. a TAG of digits that literal_eval turned into an int
    raise MdistillerError(
        f"config key {full_key} in {source} expects {type(default).__name__} (default {default!r}), "
        f"got {type(value).__name__} {value!r}"
    )


def merge_dict(cfg: CN, values: dict, source: str, prefix: str = "", root: CN | None = None) -> None:
    """Merge a nested dict of values into cfg, checking every key and type; errors name the key and the source."""
    root = cfg if root is None else root
    for key, value in values.items():
        full_key = prefix + str(key)
        if key not in cfg:
            raise _unknown_key_error(full_key, root, source)
        default = cfg[key]
        if isinstance(default, CN):
            if not isinstance(value, dict):
                raise MdistillerError(f"config key {full_key} in {source} is a section; got {value!r}")
            merge_dict(default, value, source, full_key + ".", root)
        else:
            cfg[key] = _coerce(_decode(value), default, full_key, source)


class _StrictLoader(yaml.SafeLoader):
    """yaml's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last silently: a second
    `SOLVER:` section would drop the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                first = seen[key].start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key} given twice (first at line {first})", key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _yaml_error_line(path: str, exc: yaml.MarkedYAMLError) -> str:
    """`config file <path> line L, column C is not valid YAML: <problem> (<context>)`, 1-based like an editor."""
    mark = exc.problem_mark or exc.context_mark
    place = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = exc.problem or exc.context or type(exc).__name__
    context = ""
    if exc.context and exc.problem:
        begun = exc.context_mark
        context = f" ({exc.context}" + (f" begun at line {begun.line + 1})" if begun is not None else ")")
    return f"config file {path}{place} is not valid YAML: {problem}{context}"


def read_yaml_mapping(path: str) -> dict:
    """A config file's mapping (keys given twice refused); one-line errors for a missing file, invalid YAML or a
    file that is not a mapping."""
    if not os.path.isfile(path):
        raise MdistillerError(f"config file not found: {path}")
    try:
        with open(path) as f:
            values = yaml.load(f, Loader=_StrictLoader) or {}
    except yaml.MarkedYAMLError as exc:
        raise MdistillerError(_yaml_error_line(path, exc)) from None
    except yaml.YAMLError as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MdistillerError(f"config file {path} is not valid YAML: {first_line}") from None
    if not isinstance(values, dict):
        raise MdistillerError(f"config file {path} must hold a mapping of sections, got {type(values).__name__}")
    return values


def merge_file(cfg: CN, path: str) -> None:
    """Merge a YAML config file (with yacs' `_BASE_` inheritance) into cfg; a detectron2-style detection file
    (upstream's detection/configs) is translated into our keys first (engine/detectron2_cfg.py)."""
    if not path:
        raise MdistillerError("no config file given: pass --cfg configs/<dataset>/<method>/<pair>.yaml")
    if not os.path.isfile(path):
        raise MdistillerError(f"config file not found: {path}")
    if is_detectron2_config(path):  # upstream's detection YAML files: translated into our keys
        merge_dict(cfg, translate_detectron2_config(path), path)
        return
    values = read_yaml_mapping(path)
    base = values.pop("_BASE_", None)
    if base:
        merge_file(cfg, base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base))
    merge_dict(cfg, values, path)


def merge_opts(cfg: CN, opts: list[str]) -> None:
    """Merge command-line `KEY VALUE ...` pairs into cfg."""
    if len(opts) % 2:
        raise MdistillerError(f"overrides come as KEY VALUE pairs; got an odd number: {' '.join(opts)}")
    for full_key, raw in zip(opts[::2], opts[1::2]):
        nested: dict = {}
        node = nested
        parts = full_key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = raw
        merge_dict(cfg, nested, "the command line")


def cfg_value(cfg: CN, full_key: str) -> Any:
    """The value of a dotted key (`KD.LOSS.KD_WEIGHT`)."""
    node: Any = cfg
    for part in full_key.split("."):
        node = node[part]
    return node


def leaf_values(cfg: CN) -> dict[str, Any]:
    """Every leaf of a config as {dotted key: value}."""
    return {key: cfg_value(cfg, key) for key in _all_keys(cfg) if not isinstance(cfg_value(cfg, key), CN)}


def override_value(full_key: str, raw: str) -> Any:
    """The value a command-line `KEY VALUE` pair gives its key, typed as the merge types it."""
    return _coerce(_decode(raw), cfg_value(CFG, full_key), full_key, "the command line")


def validate_cfg(cfg: CN) -> None:
    """Reject values no run can use, before anything is built."""
    positive = {
        "SOLVER.EPOCHS": cfg.SOLVER.EPOCHS,
        "SOLVER.BATCH_SIZE": cfg.SOLVER.BATCH_SIZE,
        "DATASET.TEST.BATCH_SIZE": cfg.DATASET.TEST.BATCH_SIZE,
        "SOLVER.LR": cfg.SOLVER.LR,
    }
    for key, value in positive.items():
        if value <= 0:
            raise MdistillerError(f"{key} must be positive, got {value}")
    if cfg.DATASET.REDUCTION:
        raise MdistillerError("DATASET.REDUCTION True (the CAT-KD repo's training-set reduction) is not implemented: "
                              "set it False")
    if cfg.DATASET.NUM_WORKERS < 0:
        raise MdistillerError(f"DATASET.NUM_WORKERS must be >= 0, got {cfg.DATASET.NUM_WORKERS}")
    if cfg.LOG.SAVE_CHECKPOINT_FREQ <= 0:
        raise MdistillerError(f"LOG.SAVE_CHECKPOINT_FREQ must be positive, got {cfg.LOG.SAVE_CHECKPOINT_FREQ}")
    if cfg.SOLVER.LR_WARMUP_EPOCHS < 0:
        raise MdistillerError(f"SOLVER.LR_WARMUP_EPOCHS must be >= 0, got {cfg.SOLVER.LR_WARMUP_EPOCHS}")
    if cfg.SOLVER.LR_SCHEDULE not in LR_SCHEDULES:
        raise MdistillerError(f"SOLVER.LR_SCHEDULE {cfg.SOLVER.LR_SCHEDULE!r} is not supported; use one of "
                              f"{', '.join(LR_SCHEDULES)}")
    if cfg.SOLVER.COMPILE not in COMPILE_MODES:
        modes = ", ".join(repr(m) for m in COMPILE_MODES)
        raise MdistillerError(f"SOLVER.COMPILE {cfg.SOLVER.COMPILE!r} is not a torch.compile mode; use one of {modes}")

    dtype = cfg.DISTILLER.TEACHER_CACHE_DTYPE
    if dtype not in TEACHER_CACHE_DTYPES:
        why = " (bf16 keeps 7 mantissa bits to fp16's 10: 8x coarser at the same size)" if dtype == "bf16" else ""
        raise MdistillerError(f"DISTILLER.TEACHER_CACHE_DTYPE {dtype!r} is not a cache storage{why}; use one of "
                              f"{', '.join(TEACHER_CACHE_DTYPES)}")
    check_choices(cfg)
    if cfg.SOLVER.TYPE not in OPTIMIZERS:
        raise MdistillerError(f"SOLVER.TYPE {cfg.SOLVER.TYPE!r} is not supported; use one of {', '.join(OPTIMIZERS)}")
    if cfg.SOLVER.NAN_POLICY not in NAN_POLICIES:
        raise MdistillerError(
            f"SOLVER.NAN_POLICY must be one of {', '.join(NAN_POLICIES)}, got {cfg.SOLVER.NAN_POLICY!r}"
        )
    stages = list(cfg.SOLVER.LR_DECAY_STAGES)
    if any(not isinstance(s, (int, float)) or isinstance(s, bool) or s <= 0 for s in stages) or any(
        b <= a for a, b in zip(stages, stages[1:])
    ):
        raise MdistillerError(f"SOLVER.LR_DECAY_STAGES must be strictly increasing positive epochs, got {stages}")


def data_cfg(dataset_type: str, data_root: str | None = None, image_size: int | None = None) -> CN:
    """The defaults pointed at a data set (for tools that evaluate a checkpoint without a run config)."""
    cfg = default_cfg()
    cfg.DATASET.TYPE = dataset_type
    if data_root:
        cfg.DATASET.ROOT = data_root
    if image_size:
        cfg.DATASET.IMAGE_SIZE = image_size
    return cfg


def load_cfg(path: str, opts: Iterable[str] = ()) -> CN:
    """Defaults <- YAML file <- `KEY VALUE` overrides; returns a mutable (unfrozen) config."""
    cfg = default_cfg()
    merge_file(cfg, path)
    merge_opts(cfg, list(opts))
    return cfg


def cfg_to_dict(cfg: CN) -> dict:
    """A plain nested dict copy of a config (tuples as lists, as YAML holds them)."""
    return {
        key: cfg_to_dict(value) if isinstance(value, CN) else list(value) if isinstance(value, tuple) else value
        for key, value in cfg.items()
    }


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # equal tuples shared by several keys must not become &anchors
        return True


def cfg_text(cfg: CN) -> str:
    """The config as YAML text, loadable by load_cfg."""
    return yaml.dump(copy.deepcopy(cfg_to_dict(cfg)), Dumper=_NoAliasDumper, sort_keys=True)


def dump_cfg(cfg: CN, path: str) -> None:
    """Write the fully merged config as YAML (what the run actually used)."""
    atomic_write_text(path, cfg_text(cfg))
