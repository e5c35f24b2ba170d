"""A run's identity: what it was started with, recorded in the run folder, and checked by `--resume`.

`identity.json` (written at the start of a run, beside config.yaml) holds the merged config (flattened, `KEY: value`),
the SHA-256 of the teacher checkpoint file, the training data's fingerprint where one is cheap (CIFAR: the sha256 of
the images and labels, as the teacher-output cache computes it) and the package version. `--resume` computes the same
for the command it is given and refuses a difference in one line listing the differing keys, whether they come from
the command line or from an edited YAML file. `--resume-changed` accepts the difference: config.yaml then holds the
new recipe, the previous config.yaml and identity.json move to `config_history/config.<n>.yaml` / `identity.<n>.json`,
and the change is noted in log.txt and worklog.txt (a `# ` line, kept by the worklog's readers and by resume).

Keys that cannot change what is computed are not compared (NEUTRAL_KEYS):
- `LOG.*` (where and how often the run logs and saves), `EXPERIMENT.PROJECT` / `NAME` / `TAG` (the run's name),
  `DATASET.DOWNLOAD` (whether missing data may be fetched);
- `DATASET.NUM_WORKERS`: the recipe is the same (the data loader's worker count; the augmentation draws follow the
  workers' seeds, as on any restart with another worker count);
- `DISTRIBUTED.FIND_UNUSED_PARAMETERS`: bitwise-neutral (DDP's bookkeeping, not the gradients);
- `DISTILLER.TEACHER_CKPT` is compared by the file's content (its SHA-256), not its path: a moved teacher file is
  the same teacher, another file under the same path is not;
- `DATASET.ROOT` likewise by the data fingerprint where both runs have one (moved data are the same data).

Other speed switches (SOLVER.CHANNELS_LAST, SOLVER.COMPILE, EXPERIMENT.DETERMINISTIC, DISTILLER.TEACHER_CACHE) change
the kernels and so the bits; they are compared like any recipe key.
"""

from __future__ import annotations

import json
import os

from .. import __version__
from ..distillers import get_distiller_class
from ..errors import MdistillerError
from ..files import atomic_write_text, file_sha256
from .build import teacher_checkpoint_path
from .cfg import cfg_text, cfg_to_dict, load_cfg

IDENTITY_FILE = "identity.json"
HISTORY_DIR = "config_history"
NEUTRAL_KEYS = ("LOG.", "EXPERIMENT.PROJECT", "EXPERIMENT.NAME", "EXPERIMENT.TAG", "DATASET.DOWNLOAD",
                "DATASET.NUM_WORKERS", "DISTRIBUTED.FIND_UNUSED_PARAMETERS", "DISTILLER.TEACHER_CKPT")
TEACHER_KEY = "DISTILLER.TEACHER_CKPT"
DATA_KEY = "DATASET.ROOT"


def flat_config(cfg) -> dict[str, object]:
    """`{"SOLVER.LR": 0.05, ...}`: every leaf of the merged config (lists as lists, as JSON keeps them)."""
    out: dict[str, object] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value

    walk(cfg_to_dict(cfg), "")
    return json.loads(json.dumps(out))  # tuples and lists alike, as read back from identity.json


FINGERPRINT_MAX_BYTES = 1 << 29  # larger training sets (or ones read from files) get no fingerprint: not cheap


def training_data_fingerprint(train_loader) -> str | None:
    """The teacher cache's data fingerprint of the training set, where the loader holds it as arrays in memory
    (CIFAR); None otherwise."""
    from ..dataset.teacher_views import data_fingerprint, loader_arrays

    try:
        images, labels = loader_arrays(train_loader)
    except (AttributeError, TypeError, ValueError):
        return None
    if images.dtype != "uint8" or images.nbytes > FINGERPRINT_MAX_BYTES:
        return None
    return data_fingerprint(images, labels)


def run_identity(cfg, train_loader=None) -> dict:
    """What this run is: the flattened merged config, the teacher file's SHA-256, the data fingerprint, the version."""
    teacher_sha = None
    if get_distiller_class(cfg.DISTILLER.TYPE).declares.requires_teacher:
        path = teacher_checkpoint_path(cfg)
        teacher_sha = file_sha256(path) if os.path.isfile(path) else None
    return {"config": flat_config(cfg), "teacher_sha256": teacher_sha,
            "data_fingerprint": training_data_fingerprint(train_loader) if train_loader is not None else None,
            "version": __version__}


def _neutral(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in NEUTRAL_KEYS)


def _short(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def differences(started: dict, now: dict) -> list[str]:
    """`KEY (old -> new)` for each recipe difference between two identities (neutral keys left out)."""
    old, new = started.get("config", {}), now.get("config", {})
    out = []
    both_data = started.get("data_fingerprint") and now.get("data_fingerprint")
    for key in sorted(set(old) | set(new)):
        if _neutral(key) or (key == DATA_KEY and both_data):
            continue
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            out.append(f"{key} ({_short(old.get(key, '<absent>'))} -> {_short(new.get(key, '<absent>'))})")
    if started.get("teacher_sha256") and started.get("teacher_sha256") != now.get("teacher_sha256"):
        out.append(f"{TEACHER_KEY} (another file: sha256 {started['teacher_sha256'][:12]} -> "
                   f"{(now.get('teacher_sha256') or 'none')[:12]})")
    if both_data and started["data_fingerprint"] != now["data_fingerprint"]:
        out.append(f"{DATA_KEY} (other training data: fingerprint {started['data_fingerprint'][:12]} -> "
                   f"{now['data_fingerprint'][:12]})")
    if started.get("version") and started.get("version") != now.get("version"):
        out.append(f"mdistiller version ({started['version']} -> {now['version']})")
    return out


def recorded_identity(run_dir: str) -> dict | None:
    """The identity the run in `run_dir` started with: identity.json, or for a run from before it the config.yaml
    alone; None when neither is there."""
    path = os.path.join(run_dir, IDENTITY_FILE)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError) as exc:
            raise MdistillerError(f"{path} is unreadable ({exc}): the run's recipe cannot be checked; pass "
                                  f"--resume-changed to continue with this command's recipe") from None
    config = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(config):
        try:
            return {"config": flat_config(load_cfg(config, []))}
        except MdistillerError:  # a config of an older version with keys since renamed: nothing to compare with
            return None
    return None


def check_resume(cfg, run_dir: str, now: dict, accept_changed: bool) -> list[str]:
    """The recipe differences of a resume against the run's start; refused (one line) unless `accept_changed`."""
    started = recorded_identity(run_dir)
    if started is None:
        return []
    changed = differences(started, now)
    if changed and not accept_changed:
        raise MdistillerError(f"--resume with another recipe than {run_dir} started with: {'; '.join(changed)}. "
                              f"Resume with the recipe it started with, or pass --resume-changed to accept the "
                              f"change (recorded in config_history/)")
    return changed


def record_identity(cfg, run_dir: str, identity: dict, changed: list[str], resume: bool = True) -> str | None:
    """Write config.yaml and identity.json at the start (or resume) of a run; on resume a previous config.yaml that
    differs moves to config_history/ (with its identity.json). Returns the history file written, or None."""
    config_path, identity_path = os.path.join(run_dir, "config.yaml"), os.path.join(run_dir, IDENTITY_FILE)
    text = cfg_text(cfg)
    kept = None
    if resume and os.path.isfile(config_path):
        with open(config_path) as f:
            previous = f.read()
        if previous != text or changed:
            history = os.path.join(run_dir, HISTORY_DIR)
            os.makedirs(history, exist_ok=True)
            n = 1 + sum(1 for name in os.listdir(history) if name.startswith("config.") and name.endswith(".yaml"))
            kept = os.path.join(history, f"config.{n}.yaml")
            os.replace(config_path, kept)
            if os.path.isfile(identity_path):
                os.replace(identity_path, os.path.join(history, f"identity.{n}.json"))
    atomic_write_text(config_path, text)
    atomic_write_text(identity_path, json.dumps(identity, indent=1, sort_keys=True) + "\n")
    return kept


def start_identity(cfg, run_dir: str, train_loader, resume: bool, accept_changed: bool) -> tuple[dict, list[str]]:
    """This run's identity and, on resume, its recipe differences against the run's start (refused unless
    `accept_changed`)."""
    identity = run_identity(cfg, train_loader)
    changed = check_resume(cfg, run_dir, identity, accept_changed) if resume else []
    return identity, changed
