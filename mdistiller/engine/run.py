"""One training run from a frozen config: name it, seed it, build it, train it, record the result.

Under torchrun every rank runs train_run: rank 0 alone checks and creates the output folders (its verdict is shared,
so every rank stops on it), dumps config.yaml and appends the result; every rank builds the data (its shard), the
teacher and the student from the same seed, then draws its own random numbers (augmentation, dropout).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from typing import Sequence

import torch

from .. import distributed
from ..dataset import get_dataset
from ..distillers import get_distiller_class
from ..errors import MdistillerError
from ..log import get_logger, run_log
from ..rng import deterministic_mode, set_seed
from . import accel, worklog
from .build import build_distiller, teacher_home
from .cfg import cfg_text, cfg_value, override_value
from .dot import DOT_TRAINERS
from .run_identity import HISTORY_DIR, record_identity, start_identity
from .tasks import task_of
from .teacher_cache import cache_batch_needs, prepare_teacher_cache
from .trainer import Trainer
from .validate import check_first_step, validate_run

log = get_logger(__name__)

# Overrides that change where or how verbosely a run works, not what it computes: kept out of the run name.
# EXPERIMENT.NAME and TAG already name the run.
_KEYS_NOT_IN_NAME = ("DATASET.ROOT", "DATASET.NUM_WORKERS", "DATASET.DOWNLOAD", "LOG.", "DISTILLER.TEACHER_CKPT",
                     "EXPERIMENT.DETERMINISTIC", "DISTRIBUTED.FIND_UNUSED_PARAMETERS", "EXPERIMENT.NAME",
                     "EXPERIMENT.TAG", "DISTILLER.TEACHER_CACHE")


def _fmt(value: float) -> str:
    return f"{value:g}"


def run_name(cfg, opts: Sequence[str] = (), seed_in_name: bool = False) -> str:
    """EXPERIMENT.NAME (or TAG), the `KEY:VALUE` overrides, and the LS setting, so LS runs never share a folder;
    the DOT trainer's name when neither the name nor the overrides say it (upstream's DOT tags hold "dot");
    `seed:<n>` last for the runs of a --seeds sweep."""
    name = cfg.EXPERIMENT.NAME or cfg.EXPERIMENT.TAG
    final_values = dict(zip(opts[::2], opts[1::2]))  # a key given twice counts once, with its last value
    tags = [
        f"{key}:{_trained_value(cfg, key, value)}"
        for key, value in final_values.items()
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in _KEYS_NOT_IN_NAME)
    ]
    if cfg.SOLVER.TRAINER in DOT_TRAINERS and not _names_trainer(name, tags, cfg.SOLVER.TRAINER):
        tags.append(cfg.SOLVER.TRAINER)
    if cfg.EXPERIMENT.LOGIT_STAND:
        tags.append(ls_tag(cfg))
    if seed_in_name:
        tags.append(f"seed:{cfg.EXPERIMENT.SEED}")
    if tags:
        name += "," + ",".join(tags)
    return _fits_a_folder_name(name.replace(os.sep, "_"))


RUN_NAME_MAX_BYTES = 200  # file systems allow 255 bytes a name; the checkpoints' temporary suffixes need a few more


def _fits_a_folder_name(name: str) -> str:
    """`name`, or when longer than RUN_NAME_MAX_BYTES its head and `,~<10 hex>` of the whole name: distinct runs stay
    in distinct folders (config.yaml says every value) instead of a bare "File name too long"."""
    if len(name.encode()) <= RUN_NAME_MAX_BYTES:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    head = name.encode()[: RUN_NAME_MAX_BYTES - len(digest) - 2].decode(errors="ignore")
    return f"{head},~{digest}"


def _trained_value(cfg, key: str, typed: str) -> str:
    """The value as typed when it is the one that trains, or the factor the LS flags scale (DKD's and RLD's
    `--kd-weight` multiply the typed ALPHA / BETA: `DKD.BETA:2.0,LS:T2,w15` trains BETA 30); else the merged
    config's, so a name never shows a value that does not train (tools/train.py refuses a flag that would replace a
    typed key)."""
    final, value = cfg_value(cfg, key), override_value(key, typed)
    if value == final or _scaled_by_ls(cfg, key, value, final):
        return typed
    return _fmt(final) if isinstance(final, float) else str(final).replace(" ", "")


def _scaled_by_ls(cfg, key: str, value, final) -> bool:
    """Whether the LS flags recorded in cfg turn the typed value into the merged one, and would turn another into
    another (a scale, not a replacement)."""
    if not (cfg.EXPERIMENT.LOGIT_STAND and cfg.EXPERIMENT.BASE_TEMP > 0):
        return False
    mapping = get_distiller_class(cfg.DISTILLER.TYPE).declares.logit_stand
    if mapping is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return False

    def mapped(typed_value):
        probe = cfg.clone()
        probe.defrost()
        section, _, leaf = key.rpartition(".")
        cfg_value(probe, section)[leaf] = typed_value
        mapping(probe, cfg.EXPERIMENT.BASE_TEMP, cfg.EXPERIMENT.KD_WEIGHT)
        return cfg_value(probe, key)

    return mapped(value) == final and mapped(type(value)(value * 2 + 1)) != final


def _names_trainer(name: str, tags: list[str], trainer: str) -> bool:
    """Whether a run name (its comma-separated words) or its override tags already say the DOT trainer."""
    words = {word.strip().lower() for word in name.split(",")}
    return bool(words & {"dot", trainer}) or any(tag.startswith("SOLVER.TRAINER:") for tag in tags)


def ls_tag(cfg) -> str:
    """`LS:T<τ>,w<w>` from the flags' values (just `LS` when LOGIT_STAND was switched on in the YAML itself)."""
    if cfg.EXPERIMENT.BASE_TEMP > 0:
        return f"LS:T{_fmt(cfg.EXPERIMENT.BASE_TEMP)},w{_fmt(cfg.EXPERIMENT.KD_WEIGHT)}"
    return "LS"


def result_log_name(cfg) -> str:
    """`<TYPE>,<TEACHER>,<STUDENT>[,<base_temp>,<kd_weight>].txt`, the logit-standardisation repo's naming; `<TYPE>+DOT`
    under SOLVER.TRAINER dot / crd_dot (`KD+DOT,resnet32x4,resnet8x4.txt`), so DOT runs never mix with plain ones."""
    teacher = cfg.DISTILLER.TEACHER if get_distiller_class(cfg.DISTILLER.TYPE).declares.requires_teacher else "none"
    method = cfg.DISTILLER.TYPE + ("+DOT" if cfg.SOLVER.TRAINER in DOT_TRAINERS else "")
    parts = [method, teacher, cfg.DISTILLER.STUDENT]
    if cfg.EXPERIMENT.LOGIT_STAND and cfg.EXPERIMENT.BASE_TEMP > 0:
        parts += [_fmt(cfg.EXPERIMENT.BASE_TEMP), _fmt(cfg.EXPERIMENT.KD_WEIGHT)]
    elif cfg.EXPERIMENT.LOGIT_STAND:
        parts.append("LS")
    return ",".join(parts) + ".txt"


def config_hash(cfg) -> str:
    """A short hash of the recipe: the merged config less the seed and the where-to-work keys, so the seeds of one
    recipe share it."""
    recipe = cfg.clone()
    recipe.defrost()
    recipe.EXPERIMENT.SEED = 0
    recipe.EXPERIMENT.DETERMINISTIC = False  # same computation, only reproducible to the bit
    recipe.DATASET.ROOT = recipe.DATASET.NUM_WORKERS = recipe.LOG.PREFIX = recipe.LOG.RESULTS_DIR = None
    recipe.DISTILLER.TEACHER_CKPT = ""
    # an fp32 teacher cache gives the live teacher's logits (the same recipe, where the cache lies is no part of it);
    # fp16 storage rounds them: another recipe
    fp16_cache = bool(recipe.DISTILLER.TEACHER_CACHE) and recipe.DISTILLER.TEACHER_CACHE_DTYPE == "fp16"
    recipe.DISTILLER.TEACHER_CACHE = "fp16" if fp16_cache else ""
    recipe.DISTILLER.TEACHER_CACHE_DTYPE = "fp32"
    recipe.SOLVER.CHANNELS_LAST, recipe.SOLVER.COMPILE = False, ""  # layout and compilation: same maths
    return hashlib.sha1(cfg_text(recipe).encode()).hexdigest()[:10]


def append_result(cfg, run_dir: str, result: dict[str, float]) -> str:
    """Append one line for a finished run to LOG.RESULTS_DIR/<result_log_name>; returns the file's path.

    Idempotent: a line already there (a finished run resumed again) is not written twice.
    """
    path = os.path.join(cfg.LOG.RESULTS_DIR, result_log_name(cfg))
    metric = task_of(cfg).result_name
    length = f"iters={cfg.SOLVER.MAX_ITER}" if cfg.SOLVER.MAX_ITER > 0 else f"epochs={cfg.SOLVER.EPOCHS}"
    line = (
        f"best_{metric}={result['best_acc']:.4f}\tlast_{metric}={result['last_acc']:.4f}\tseed={cfg.EXPERIMENT.SEED}\t"
        f"{length}\tconfig_hash={config_hash(cfg)}\trun_dir={os.path.abspath(run_dir)}"
    )
    try:
        os.makedirs(cfg.LOG.RESULTS_DIR, exist_ok=True)
        if os.path.isfile(path):
            with open(path) as f:
                if line in f.read().splitlines():
                    return path
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as exc:
        raise MdistillerError(f"could not append the result to {path}: {exc.strerror or exc}") from None
    return path


def check_fits_data(cfg, num_train: int) -> None:
    """A batch larger than the training set is a config mistake (often DATASET.ROOT pointing at the wrong data)."""
    if cfg.SOLVER.BATCH_SIZE > num_train:
        raise MdistillerError(
            f"SOLVER.BATCH_SIZE {cfg.SOLVER.BATCH_SIZE} is larger than the training set ({num_train} images of "
            f"{cfg.DATASET.TYPE} in {cfg.DATASET.ROOT}): lower it or check DATASET.ROOT"
        )


def run_dir_of(cfg, opts: Sequence[str] = (), seed_in_name: bool = False) -> str:
    """LOG.PREFIX/EXPERIMENT.PROJECT/<run name>."""
    return os.path.join(cfg.LOG.PREFIX, cfg.EXPERIMENT.PROJECT, run_name(cfg, opts, seed_in_name))


def default_device() -> torch.device:
    """CUDA when present (cuda:LOCAL_RANK under torchrun), else CPU."""
    return distributed.device()


def step_trainer(cfg, distiller, device: torch.device, run_dir: str, teacher_cache=None) -> Trainer:
    """A Trainer to step by hand (its train_step and epoch_progress): no loaders, so no epochs, validation or
    checkpoints (tools/bench.py times the very step a run trains with)."""
    return Trainer(run_dir, distiller, None, None, cfg, device, teacher_cache=teacher_cache)


def train_run(cfg, opts: Sequence[str] = (), resume: bool = False, seed_in_name: bool = False,
              resume_changed: bool = False, resume_from: str = "") -> dict:
    """Train the run that cfg (frozen) describes; returns best/last top-1 and the run directory.

    On resume the recipe is checked against the one the run started with (engine/run_identity.py): a difference is
    refused unless `resume_changed`, which records it (config_history/, log.txt, worklog.txt). A truncated or corrupt
    `latest` is refused naming the newest intact `epoch_<n>`; `resume_from` (that name) continues from it, keeping the
    damaged file as `latest.damaged`.

    First everything that can be checked without training (engine/validate.py), then the data and the distiller are
    built (a damaged file or a checkpoint of another architecture fails there), and only then is the run folder
    created: a refused run leaves nothing behind. SIGTERM/SIGINT during training raise guards.TrainingInterrupted
    after saving `latest`.
    """
    run_dir = run_dir_of(cfg, opts, seed_in_name)
    device = default_device()
    with distributed.raised_on_every_rank():
        distributed.on_main_then_share(lambda: validate_run(cfg, run_dir, resume or bool(resume_from), device,
                                                            resume_from))
    resume = resume or bool(resume_from)
    set_seed(cfg.EXPERIMENT.SEED)
    with deterministic_mode(cfg.EXPERIMENT.DETERMINISTIC, device):
        distiller_class = get_distiller_class(cfg.DISTILLER.TYPE)
        train_loader, val_loader, num_train, num_classes = get_dataset(
            cfg, distiller_class.declares.train_views, seed=cfg.EXPERIMENT.SEED, device=device,
            needs={**distiller_class.batch_needs_of(cfg), **cache_batch_needs(cfg, distiller_class)},
        )
        check_fits_data(cfg, num_train)
        with distributed.raised_on_every_rank():
            identity, changed = distributed.on_main_then_share(
                lambda: start_identity(cfg, run_dir, train_loader, resume, resume_changed)) or (None, [])
        distiller = build_distiller(cfg, num_classes, num_data=num_train)
        teacher_cache = prepare_teacher_cache(cfg, distiller, train_loader, device)  # None when off
        with distributed.raised_on_every_rank():
            check_first_step(cfg, distiller, train_loader, device, teacher_cache)
        if distributed.rank() > 0:  # built identically on every rank; from here on each rank draws its own numbers
            set_seed(distributed.rank_seed(cfg.EXPERIMENT.SEED, distributed.rank()))
        if distributed.is_main_process():
            os.makedirs(run_dir, exist_ok=True)
            if resume_from:
                fall_back_to(run_dir, resume_from)
        distributed.barrier()  # the other ranks wait until the run folder exists
        with run_log(run_dir):
            if distributed.is_main_process():
                _record_start(cfg, run_dir, identity, changed, resume)
            trainer = Trainer(run_dir, distiller, train_loader, val_loader, cfg, device, teacher_cache=teacher_cache)
            log.info(
                f"run {run_dir}: {cfg.DISTILLER.TYPE} {cfg.DISTILLER.STUDENT}"
                + (f" <- {cfg.DISTILLER.TEACHER}" if distiller_class.declares.requires_teacher else "")
                + f", {num_train} training images, {num_classes} classes, seed {cfg.EXPERIMENT.SEED}, device {device}"
                + (f" x {distributed.world_size()} processes (global batch {cfg.SOLVER.BATCH_SIZE})"
                   if distributed.world_size() > 1 else "") + ", "
                f"extra parameters {distiller.get_extra_parameters()}, {accel.describe(cfg)}"
                + (f", {trainer.optimizer.describe()}" if hasattr(trainer.optimizer, "describe") else "")
                + (", deterministic algorithms" if cfg.EXPERIMENT.DETERMINISTIC else "")
            )
            if teacher_cache is not None:
                log.info(teacher_cache.describe())
            try:
                result = trainer.train(resume=resume)
            except RuntimeError as exc:  # an op without a deterministic kernel, under EXPERIMENT.DETERMINISTIC
                lost = lost_peer(exc)
                if lost:  # another rank died (SIGKILL, OOM): stop now, in one line, instead of a traceback
                    raise MdistillerError(
                        f"another process of this {distributed.world_size()}-process job stopped ({lost}); "
                        f"{trainer.checkpoints.last_good()}: continue with --resume"
                    ) from None
                if not (cfg.EXPERIMENT.DETERMINISTIC and "deterministic" in str(exc)):
                    raise
                raise MdistillerError(
                    f"EXPERIMENT.DETERMINISTIC: {str(exc).splitlines()[0]} (set EXPERIMENT.DETERMINISTIC False to run "
                    f"it)"
                ) from None
            result_file = append_result(cfg, run_dir, result) if distributed.is_main_process() else ""
            log.info(f"best {trainer.task.metric_label} {result['best_acc']:.2f}, last {result['last_acc']:.2f}; "
                     f"result appended to {result_file}")
            if not distiller_class.declares.requires_teacher and trainer.task.name == "classification":
                weights = os.path.join(run_dir, "student_best")
                zoo = teacher_home(cfg.DISTILLER.STUDENT, cfg.DATASET.TYPE)
                log.info(f"teacher weights: {weights}. To distil from it, pass DISTILLER.TEACHER_CKPT {weights} "
                         f"or copy it to {zoo}")
    sys.stdout.flush()
    return {**result, "run_dir": run_dir}


# What gloo / NCCL raise on the surviving ranks when a peer process is gone
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "remote process exited",
              "NCCL communicator was aborted", "Socket closed")


def lost_peer(exc: BaseException) -> str | None:
    """The phrase of a collective's error that says a peer process is gone (under torchrun), or None."""
    if distributed.world_size() <= 1:
        return None
    text = str(exc)
    return next((f"{phrase.lower()} in a collective" for phrase in _PEER_LOST if phrase in text), None)


def fall_back_to(run_dir: str, name: str) -> None:
    """`latest` := a copy of the run's checkpoint `name` (checked intact); a `latest` there is kept as
    `latest.damaged`."""
    latest = os.path.join(run_dir, "latest")
    if os.path.exists(latest):
        os.replace(latest, latest + ".damaged")
    temporary = latest + ".copying"
    shutil.copyfile(os.path.join(run_dir, name), temporary)
    os.replace(temporary, latest)
    log.warning(f"continuing from {name} (--resume-from); the previous latest, if any, is kept as latest.damaged")


def _record_start(cfg, run_dir: str, identity: dict, changed: list[str], resume: bool) -> None:
    """config.yaml and identity.json of the run (a previous config.yaml that differs kept in config_history/); an
    accepted recipe change (--resume-changed) noted in log.txt and worklog.txt."""
    kept = record_identity(cfg, run_dir, identity, changed, resume)
    if changed:
        note = f"resumed with a changed recipe (--resume-changed): {'; '.join(changed)}"
        where = f"; the previous config: {os.path.relpath(kept, run_dir)}" if kept else ""
        log.warning(note + where)
        worklog.append(run_dir, f"{worklog.NOTE}{note}{where}{os.linesep}")
    elif kept:
        log.info(f"config.yaml: only keys that do not change what is computed differ from the run's start; the "
                 f"previous one is {HISTORY_DIR}/{os.path.basename(kept)}")


def seeded_cfg(cfg, seed: int):
    """A frozen copy of cfg with EXPERIMENT.SEED set: one run of a `--seeds` sweep."""
    out = cfg.clone()
    out.defrost()
    out.EXPERIMENT.SEED = int(seed)
    out.freeze()
    return out


def train_sweep(cfg, opts: Sequence[str], seeds: Sequence[int], resume: bool = False,
                resume_changed: bool = False) -> list[dict]:
    """`--seeds`: the same recipe under each seed, one after the other, each in its own run folder (`,seed:<n>` in
    its name) and each appending its own result line. With resume, a seed whose folder holds `latest` continues (a
    finished one has nothing to do) and the others start."""
    if "EXPERIMENT.SEED" in list(opts)[::2]:
        raise MdistillerError("pass the seeds either with --seeds or as EXPERIMENT.SEED, not both")
    if len(set(seeds)) != len(seeds):
        raise MdistillerError(f"--seeds lists a seed twice: {','.join(str(s) for s in seeds)}")
    cfgs = [seeded_cfg(cfg, seed) for seed in seeds]
    started = [os.path.exists(os.path.join(run_dir_of(c, opts, True), "latest")) for c in cfgs]
    if not resume and any(started):
        taken = run_dir_of(cfgs[started.index(True)], opts, True)
        raise MdistillerError(f"{taken} already holds a run: pass --resume to continue the sweep")
    return [train_run(c, opts, resume=resume and done, seed_in_name=True, resume_changed=resume_changed)
            for c, done in zip(cfgs, started)]
