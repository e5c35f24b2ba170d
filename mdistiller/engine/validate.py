"""One validation pass before any side effect: everything that can be known without training is checked here, before
the run folder, the logs or the data are touched, so a refused run leaves nothing behind.

Checked: the config's values (cfg.validate_cfg), the distiller and its SOLVER.TRAINER name, a method's top-level key
set for another method, the model names, what the distiller cannot train on (Mixup's soft labels), whether the
teacher-output cache can serve it, the data's presence, the teacher file, the named teacher cache (or auto's folder),
a global batch the processes cannot split, the run folder's state (an existing run without --resume, --resume without
a run) and whether the output folders can be written. What needs the files read (a damaged data file, a teacher
checkpoint of another architecture) is found while the run is built, still before its folder exists; so are a resumed
run's recipe against the one it started with (engine/run_identity.py, once the data are loaded: their fingerprint is
part of it) and what needs the built distiller (`check_first_step`: the optimizer and update rule, the batch mixer
and, under DOT, the loss terms of one dry forward on a two-image batch).
"""

from __future__ import annotations

import copy
import os
import tempfile

import torch
from torch.utils.data import default_collate

from .. import distributed
from ..dataset import check_data
from ..dataset.mixing import build_batch_mixer, mixing_enabled
from ..distillers import Key, distiller_dict, get_distiller_class, method_sections
from ..errors import MdistillerError
from ..models.common import num_classes_of_model
from ..rng import get_rng_state, set_rng_state
from . import accel
from .build import check_models, teacher_checkpoint_path
from .cfg import CFG, TRAINERS, validate_cfg
from .checkpoint import load_checkpoint
from .dot import DOT_TRAINERS, check_dot, split_losses
from .optim import build_optimizer, update_rule
from .placement import check_distributed
from .schedule import check_schedule
from .tasks import task_name
from .teacher_cache import cache_refusal, check_cache_files
from .teacher_cache_identity import AUTO, auto_root


def check_trainer(cfg, distiller_class) -> None:
    """SOLVER.TRAINER must name how this distiller trains: "base" always, the LS repo's "ours"/"aug" for MLKD, "crd"
    for CRD (each a distiller declares in `Declaration.upstream_trainers`), or "dot"/"crd_dot" = the same with DOT's
    update."""
    name = cfg.SOLVER.TRAINER
    if name not in TRAINERS:
        raise MdistillerError(f"SOLVER.TRAINER {name!r} is not one of upstream's trainers: {', '.join(TRAINERS)}")
    base = DOT_TRAINERS.get(name, name)
    accepted = distiller_class.declares.upstream_trainers
    if base not in accepted:
        raise MdistillerError(
            f"SOLVER.TRAINER {name} is upstream's trainer for another method; DISTILLER.TYPE {cfg.DISTILLER.TYPE} "
            f"trains with {' or '.join(accepted)}"
        )
    if name in DOT_TRAINERS:
        check_dot(cfg, distiller_class)


def check_recipe(cfg):
    """The config's values, the distiller, its trainer name and models, and what it cannot train on; returns the
    distiller class."""
    validate_cfg(cfg)
    distiller_class = get_distiller_class(cfg.DISTILLER.TYPE)
    declares = distiller_class.declares
    check_task(cfg, cfg.DISTILLER.TYPE, declares.task)
    check_trainer(cfg, distiller_class)
    if mixing_enabled(cfg) and not declares.accepts_soft_targets:
        raise MdistillerError(
            f"DATASET.MIXUP gives soft labels, which {distiller_class.__name__} cannot train on "
            f"(its losses index the target class): set the DATASET.MIXUP values to 0"
        )
    distiller_class.hparams(cfg)  # the method's own keys, read and checked where the method reads them
    check_top_level_keys(cfg, cfg.DISTILLER.TYPE, declares)
    if cfg.EXPERIMENT.LOGIT_STAND and declares.logit_stand is None:
        raise MdistillerError(declares.logit_stand_refusal or f"EXPERIMENT.LOGIT_STAND applies to logit methods; "
                              f"DISTILLER.TYPE {cfg.DISTILLER.TYPE} is not one: set it False")
    check_models(cfg, declares.requires_teacher)
    refusal = cache_refusal(cfg, distiller_class)
    if refusal:
        raise MdistillerError(refusal)
    return distiller_class


def check_task(cfg, method: str, method_task: str) -> None:
    """The distiller trains the task DATASET.TYPE declares; the schedule is the task's (detection: iterations); the
    keys only the other task reads stay at their defaults; what the detection task does not support is refused."""
    task = task_name(cfg)
    if method_task != task:
        same_task = sorted(name for name, c in distiller_dict.items() if c.declares.task == task)
        raise MdistillerError(f"DISTILLER.TYPE {method} is a {method_task} method but DATASET.TYPE "
                              f"{cfg.DATASET.TYPE} is {task} data; {task} methods: {', '.join(same_task)}")
    check_schedule(cfg, CFG, task)
    if cfg.SOLVER.WEIGHT_DECAY_NORM >= 0 and (cfg.SOLVER.TYPE != "SGD" or cfg.SOLVER.TRAINER in DOT_TRAINERS):
        raise MdistillerError(f"SOLVER.WEIGHT_DECAY_NORM {cfg.SOLVER.WEIGHT_DECAY_NORM} applies to SGD (detectron2's "
                              f"param groups); SOLVER.TYPE {cfg.SOLVER.TYPE} / SOLVER.TRAINER {cfg.SOLVER.TRAINER} do "
                              f"not read it: set it -1")
    if task != "detection":
        for key, default in CFG.DETECTION.items():
            if cfg.DETECTION[key] != default:
                raise MdistillerError(f"DETECTION.{key} is read by the detection task (DATASET.TYPE coco) only; "
                                      f"DATASET.TYPE {cfg.DATASET.TYPE} does not read it: leave it at {default!r}")
        return
    unsupported = {
        "DETECTION.MASK_ON": (cfg.DETECTION.MASK_ON, "Mask R-CNN students are not built (docs/detection.md)"),
        "SOLVER.CHANNELS_LAST": (cfg.SOLVER.CHANNELS_LAST, "not wired for detection batches"),
        "SOLVER.COMPILE": (cfg.SOLVER.COMPILE, "not wired for detection (dynamic image sizes)"),
        "DATASET.AUGMENT": (cfg.DATASET.AUGMENT, "detection uses detectron2's resize and flip"),
        "DISTILLER.TEACHER_CACHE": (cfg.DISTILLER.TEACHER_CACHE, "the cache holds classification logits"),
        # ImageNet's data keys, which the COCO reader does not read
        "DATASET.IMAGE_SIZE": (cfg.DATASET.IMAGE_SIZE != CFG.DATASET.IMAGE_SIZE and cfg.DATASET.IMAGE_SIZE,
                               "the sizes are DETECTION.MIN_SIZE_* / MAX_SIZE_*"),
        "DATASET.GPU_DECODE": (cfg.DATASET.GPU_DECODE, "COCO images are decoded by the loader's workers"),
        "DATASET.SKIP_BAD_IMAGES": (cfg.DATASET.SKIP_BAD_IMAGES, "an unreadable COCO image stops the run"),
    }
    for key, (value, why) in unsupported.items():
        if value:
            raise MdistillerError(f"{key} {value!r} is not supported for detection ({why}): leave it unset")


def check_top_level_keys(cfg, method: str, declares) -> None:
    """A single top-level key a method declares (CAT-KD's if_test, device, ...) set away from its default is refused
    for a method that does not read it: nothing would act on it."""
    for name, spec in method_sections().items():
        if isinstance(spec, Key) and name not in declares.config_sections and cfg[name] != spec.default:
            readers = sorted(t for t, c in distiller_dict.items() if name in c.declares.config_sections)
            raise MdistillerError(f"{name} {cfg[name]!r} is read by {', '.join(readers)}, not by DISTILLER.TYPE "
                                  f"{method}: leave it at {spec.default!r}")


def check_writable(folder: str, what: str) -> None:
    """That `folder` can be created and written, without creating it: its nearest existing ancestor must be a
    writable folder (probed with a temporary file that is removed at once)."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        raise MdistillerError(f"cannot write to {what} {folder}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise MdistillerError(f"cannot write to {what} {folder}: {exc.strerror or exc}") from None


def check_outputs(cfg, run_dir: str, resume: bool, resume_from: str = "") -> None:
    """The run folder's state against --resume (and that the checkpoint it continues from is intact), and that the run
    folder and LOG.RESULTS_DIR can be written."""
    latest = os.path.join(run_dir, "latest")
    has_run = os.path.exists(latest)
    if resume_from:
        check_fallback(run_dir, resume_from)
        has_run = True
    elif resume and has_run:
        check_latest(run_dir)
    if resume and not has_run:
        raise MdistillerError(f"resume checkpoint not found: {latest} (no run to continue there; leave out --resume)")
    if has_run and not resume:
        raise MdistillerError(
            f"{run_dir} already holds a run: pass --resume to continue it, or set EXPERIMENT.NAME for a new one"
        )
    check_writable(run_dir, "the run folder (LOG.PREFIX)")
    check_writable(cfg.LOG.RESULTS_DIR, "LOG.RESULTS_DIR")


def validate_run(cfg, run_dir: str, resume: bool, device: torch.device, resume_from: str = "") -> None:
    """Every check that needs no training and writes nothing (see the module docstring)."""
    distiller_class = check_recipe(cfg)
    check_distributed(cfg, device, distributed.world_size())
    check_data(cfg)
    if distiller_class.declares.requires_teacher:
        teacher_checkpoint_path(cfg)
    check_teacher_cache(cfg, device)
    check_outputs(cfg, run_dir, resume, resume_from)


def checkpoint_problem(path: str) -> str | None:
    """Why the trainer checkpoint at `path` cannot be resumed from (truncated, corrupt, not a trainer checkpoint), or
    None when it loads."""
    try:
        state = load_checkpoint(path, "resume checkpoint")
    except MdistillerError as exc:
        text = str(exc)
        return text if "not found" in text else f"{path} is truncated or corrupt ({text.partition(' (')[2][:-1]})"
    if "optimizer" not in state or "epoch" not in state:
        return f"{path} is not a trainer checkpoint (no optimizer/epoch)"
    return None


def newest_intact_epoch(run_dir: str) -> str | None:
    """The name of the newest `epoch_<n>` in the run folder that loads, or None."""
    numbered = []
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
        head, _, number = name.partition("_")
        if head == "epoch" and number.isdigit():
            numbered.append((int(number), name))
    for _, name in sorted(numbered, reverse=True):
        if checkpoint_problem(os.path.join(run_dir, name)) is None:
            return name
    return None


def check_latest(run_dir: str) -> None:
    """`latest` must load: a truncated or corrupt one is named, with the newest intact epoch_<n> and the flag that
    continues from it."""
    problem = checkpoint_problem(os.path.join(run_dir, "latest"))
    if problem is None:
        return
    fallback = newest_intact_epoch(run_dir)
    if fallback:
        hint = f"the newest intact checkpoint is {os.path.join(run_dir, fallback)}: continue from it with " \
               f"--resume-from {fallback}"
    else:
        hint = "no intact epoch_<n> to fall back to (LOG.SAVE_CHECKPOINT_FREQ): start the run again in a new folder"
    raise MdistillerError(f"{problem}; {hint}")


def check_fallback(run_dir: str, name: str) -> None:
    """`--resume-from <name>`: an intact trainer checkpoint of the run folder (epoch_<n>, best)."""
    if os.path.basename(name) != name or name in ("", ".", "..") or name == "latest":
        raise MdistillerError(f"--resume-from takes the name of a checkpoint in the run folder (epoch_<n>, best), "
                              f"got {name!r}; plain --resume continues from latest")
    problem = checkpoint_problem(os.path.join(run_dir, name))
    if problem:
        raise MdistillerError(f"--resume-from {name}: {problem}")


def check_teacher_cache(cfg, device: torch.device) -> None:
    """DISTILLER.TEACHER_CACHE: a named cache is there and fits the config; auto's folder can be written."""
    if cfg.DISTILLER.TEACHER_CACHE == AUTO:
        check_writable(auto_root(cfg), "the teacher cache folder (DATASET.ROOT/teacher_cache)")
    else:
        check_cache_files(cfg, device)


def check_first_step(cfg, distiller, train_loader, device: torch.device, teacher_cache=None) -> None:
    """What refuses only once the distiller is built, checked before the run folder exists: the optimizer and its
    update rule, the batch mixer, and under DOT (which splits the loss into task and distillation terms) the terms
    one dry training forward returns for the config (a method whose distillation weights are all 0 returns none).

    The dry forward runs on a copy of the distiller with two training images taken from the data set (not the loader:
    its sampler is untouched) and every RNG state restored afterwards, so the run trains as it would without it."""
    update_rule(build_optimizer(cfg, distiller))
    mixer = build_batch_mixer(cfg, num_classes_of_model(distiller.student))
    if cfg.SOLVER.TRAINER not in DOT_TRAINERS:
        return
    dataset = getattr(train_loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__getitem__") or len(dataset) < 2:
        return  # a device-resident or iterable data path: DOT's split is then checked at the first step
    rng = get_rng_state()
    try:
        collate = getattr(train_loader, "collate_fn", None) or default_collate
        batch = collate([dataset[0], dataset[1]])
        if teacher_cache is not None:
            batch = teacher_cache.attach(batch)
        batch = accel.batch_to_device(batch, device)
        if mixer is not None:
            batch = mixer(batch)
        dry = copy.deepcopy(distiller).to(device).train()
        with torch.no_grad():
            _, losses = dry(**batch, epoch=1)
        del dry
    except MdistillerError:
        raise
    except Exception:  # a data path this dry batch does not fit: the first step checks the split as before
        return
    finally:
        set_rng_state(rng)
    split_losses(losses, distiller.declares.distillation_terms)
