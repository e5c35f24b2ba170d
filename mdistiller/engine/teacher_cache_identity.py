"""What a teacher-output cache was computed from, and its files: a cache serves a run only when every field that
changes the teacher's output is the same (CHECKED_FIELDS); it is never keyed by sample index alone.

A cache is a folder holding
- `logits.bin`: the (N * 162, C) table, raw little-endian fp32 or fp16, row `index * 162 + view` (VIEW_ORDER);
- `identity.json`: the checked fields, plus what is only recorded (torch version, device, build time and speed, the
  verification's largest difference, where the teacher and the data were read). Written last: a folder without it is
  no cache (an unfinished build also holds `logits.partial` and `build.json`, see teacher_cache_build.py).
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch
from torch import nn

from ..dataset import num_classes_of
from ..dataset.cifar import CIFAR_FORMATS
from ..dataset.device_cifar import PAD, VIEW_ORDER, VIEWS_PER_IMAGE
from ..dataset.teacher_views import PAD_FILL, data_fingerprint
from ..errors import MdistillerError
from ..files import resolve_project_path

FORMAT = 1
TABLE_FILE = "logits.bin"
IDENTITY_FILE = "identity.json"
PARTIAL_FILE = "logits.partial"
PROGRESS_FILE = "build.json"
STORAGE = {"fp32": np.dtype("<f4"), "fp16": np.dtype("<f2")}  # DISTILLER.TEACHER_CACHE_DTYPE -> table dtype
AUTO = "auto"
AUTO_FOLDER = "teacher_cache"  # DISTILLER.TEACHER_CACHE auto: DATASET.ROOT/teacher_cache/<name>

# (field, what it is): a run whose value differs is refused, naming the first difference in this order.
CHECKED_FIELDS: tuple[tuple[str, str], ...] = (
    ("format", "cache format version"),
    ("dataset", "data set (DATASET.TYPE)"),
    ("teacher", "teacher architecture (DISTILLER.TEACHER)"),
    ("num_classes", "class count"),
    ("teacher_sha256", "teacher checkpoint (sha256 of its tensors)"),
    ("num_images", "training-set size"),
    ("data_sha256", "training set (sha256 of its uint8 images and labels)"),
    ("mean", "normalisation mean"),
    ("std", "normalisation std"),
    ("pad", "crop padding"),
    ("pad_fill", "padding value (uint8)"),
    ("views", "views per image"),
    ("view_order", "view enumeration"),
    ("dtype", "storage dtype (DISTILLER.TEACHER_CACHE_DTYPE)"),
    ("amp", "SOLVER.AMP (bf16 autocast of the teacher)"),
    ("tf32", "TF32 math (CUDA convolutions and matmuls)"),
)
# The fields known from the config alone (checked before any side effect); the hashes need the files.
RECIPE_FIELDS = tuple(name for name, _ in CHECKED_FIELDS
                      if name not in ("teacher_sha256", "num_images", "data_sha256"))


def tf32_in_use(device) -> bool:
    """Whether the teacher's fp32 convolutions or matmuls on `device` run in TF32 (CUDA only: cuDNN's default)."""
    return torch.device(device).type == "cuda" and bool(
        torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)


def recipe_identity(cfg, device) -> dict:
    """The checked fields that follow from the config and the device alone."""
    fmt = CIFAR_FORMATS[cfg.DATASET.TYPE]
    return {"format": FORMAT, "dataset": cfg.DATASET.TYPE, "teacher": cfg.DISTILLER.TEACHER,
            "num_classes": num_classes_of(cfg), "mean": list(fmt.mean), "std": list(fmt.std), "pad": PAD,
            "pad_fill": PAD_FILL, "views": VIEWS_PER_IMAGE, "view_order": VIEW_ORDER,
            "dtype": cfg.DISTILLER.TEACHER_CACHE_DTYPE, "amp": bool(cfg.SOLVER.AMP), "tf32": tf32_in_use(device)}


def teacher_fingerprint(teacher: nn.Module) -> str:
    """sha256 of the teacher's tensors (names, dtypes, shapes and values of its state dict, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def run_identity(cfg, teacher: nn.Module, images: np.ndarray, labels: np.ndarray, device) -> dict:
    """Every checked field for this config, teacher and training set on `device`."""
    return {**recipe_identity(cfg, device), "teacher_sha256": teacher_fingerprint(teacher),
            "num_images": int(len(labels)), "data_sha256": data_fingerprint(images, labels)}


def checked(identity: dict) -> dict:
    """The checked fields of an identity (what must match), in CHECKED_FIELDS order."""
    return {name: identity.get(name) for name, _ in CHECKED_FIELDS}


def cache_name(identity: dict) -> str:
    """`<dataset>_<teacher>_<dtype>_<12 hex digits of the checked fields' hash>`: the folder name `auto` uses."""
    key = hashlib.sha256(json.dumps(checked(identity), sort_keys=True).encode()).hexdigest()[:12]
    return f"{identity['dataset']}_{identity['teacher']}_{identity['dtype']}_{key}"


def auto_root(cfg) -> str:
    """Where `auto` caches live: DATASET.ROOT/teacher_cache."""
    return os.path.join(cfg.DATASET.ROOT, AUTO_FOLDER)


def cache_path(cfg, identity: dict) -> str:
    """The cache folder a run uses: DISTILLER.TEACHER_CACHE, or under auto_root named by cache_name."""
    mode = cfg.DISTILLER.TEACHER_CACHE
    if mode == AUTO:
        return os.path.join(auto_root(cfg), cache_name(identity))
    return resolve_project_path(mode)


def table_shape(identity: dict) -> tuple[int, int]:
    """(rows, classes) of the table."""
    return identity["num_images"] * identity["views"], identity["num_classes"]


def is_complete(path: str) -> bool:
    """Whether `path` holds a finished cache (its table and its identity)."""
    return os.path.isfile(os.path.join(path, IDENTITY_FILE)) and os.path.isfile(os.path.join(path, TABLE_FILE))


def _short(value) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]  # a sha256
    if isinstance(value, str) and len(value) > 40:
        return repr(value[:40] + "...")
    return json.dumps(value) if not isinstance(value, str) else value


def difference(found: dict, expected: dict, fields=None) -> str | None:
    """The first checked field (in CHECKED_FIELDS order, limited to `fields`) whose value differs, in words."""
    for name, what in CHECKED_FIELDS:
        if fields is not None and name not in fields:
            continue
        if found.get(name) != expected.get(name):
            return f"{what}: {_short(found.get(name))} in the cache, {_short(expected.get(name))} in this run"
    return None


def read_identity(path: str) -> dict:
    """The identity.json of the cache at `path`; a missing or unfinished cache is a one-line error."""
    file = os.path.join(path, IDENTITY_FILE)
    if not os.path.isfile(file):
        progress = os.path.join(path, PROGRESS_FILE)
        if os.path.isfile(progress):
            raise MdistillerError(f"teacher cache {path} is an unfinished build: run python tools/cache_teacher.py "
                                  f"--cfg <this run's config> again to finish it (it continues where it stopped)")
        raise MdistillerError(f"no teacher cache at {path} (no {IDENTITY_FILE}): build one with python "
                              f"tools/cache_teacher.py --cfg <this run's config>, or set DISTILLER.TEACHER_CACHE auto")
    try:
        with open(file) as f:
            identity = json.load(f)
    except (OSError, ValueError) as exc:
        raise MdistillerError(f"teacher cache {path}: {IDENTITY_FILE} is unreadable ({exc})") from None
    if not isinstance(identity, dict) or any(name not in identity for name, _ in CHECKED_FIELDS):
        raise MdistillerError(f"teacher cache {path}: {IDENTITY_FILE} lacks the identity fields (not a cache of "
                              f"this version: rebuild it)")
    return identity


def refuse_if_different(path: str, found: dict, expected: dict, fields=None) -> None:
    """One line naming the first difference between a cache's identity and the run's, if any."""
    why = difference(found, expected, fields)
    if why is not None:
        raise MdistillerError(
            f"teacher cache {path} was built for another {why}: it cannot serve this run. Set DISTILLER.TEACHER_CACHE "
            f"auto (finds or builds the right one) or build one with python tools/cache_teacher.py --cfg <this run's "
            f"config>"
        )
