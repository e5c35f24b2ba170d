"""Build what a config describes: models, teacher weights, distiller."""

from __future__ import annotations

import os

from torch import nn

from ..dataset import DATASETS
from ..detection.models import (
    build_detection_student,
    build_detection_teacher,
    check_detection_models,
    teacher_weights_path,
)
from ..distillers import get_distiller_class
from ..errors import MdistillerError, did_you_mean
from ..files import resolve_project_path
from ..log import get_logger
from ..models import cifar_model_dict, imagenet_model_dict, tiny_imagenet_model_dict
from ..models.cifar import CIFAR_ALIASES
from ..models.imagenet import IMAGENET_ALIASES, IMAGENET_TEACHER_DIR, find_imagenet_teacher, teacher_file_candidates
from .checkpoint import load_model_weights

# What a missing published CIFAR teacher's error tells the user to run (cli/download_ckpts.py).
DOWNLOAD_TEACHERS_HINT = "Fetch the published CIFAR-100 teachers with: python tools/download_ckpts.py"


def is_imagenet(dataset_type: str | None) -> bool:
    """Whether a DATASET.TYPE takes the ImageNet zoo (tiny_imagenet takes its own, every other type the CIFAR zoo)."""
    return dataset_type == "imagenet"


log = get_logger(__name__)


def small_image_zoo(dataset_type: str | None) -> tuple[dict, str, str]:
    """The zoo of a DATASET.TYPE other than imagenet (builders `builder(num_classes=...)`), its name in messages and
    the folder of its vanilla (teacher-training) configs."""
    if dataset_type == "tiny_imagenet":
        return tiny_imagenet_model_dict, "Tiny-ImageNet", "configs/tiny_imagenet/vanilla"
    return cifar_model_dict, "CIFAR", "configs/cifar100/vanilla"


_WARNED_ALIASES: set[tuple[str, str]] = set()


def zoo_name(name: str, dataset_type: str | None = None) -> str:
    """The zoo's name for a model: an alias of a published config (ImageNet's MobileNetV2, SDD's `<name>_sdd` on
    CIFAR and ImageNet) is mapped, with a one-line warning on stderr (once per alias and process)."""
    if is_imagenet(dataset_type):
        aliases, zoo, label = IMAGENET_ALIASES, imagenet_model_dict, "ImageNet"
    elif dataset_type == "tiny_imagenet":
        return name
    else:
        aliases, zoo, label = CIFAR_ALIASES, cifar_model_dict, "CIFAR"
    if name in aliases and name not in zoo:
        new, why = aliases[name]
        if (name, new) not in _WARNED_ALIASES:
            _WARNED_ALIASES.add((name, new))
            log.warning(f"model {name} is read as {new} on {label}: {why}")
        return new
    return name


def model_builder(name: str, dataset_type: str | None = None):
    """The zoo builder for a model name, from the zoo of DATASET.TYPE (None: the CIFAR zoo, then the ImageNet zoo
    for the names only it has); an unknown name says which names exist."""
    if is_imagenet(dataset_type):
        name = zoo_name(name, dataset_type)
        if name not in imagenet_model_dict:
            hint = did_you_mean(name, imagenet_model_dict)
            raise MdistillerError(f"unknown model {name!r}{hint}; ImageNet models: {', '.join(imagenet_model_dict)}")
        return imagenet_model_dict[name][0]
    zoo, label, _ = small_image_zoo(dataset_type)
    name = zoo_name(name, dataset_type)
    if name not in zoo and dataset_type is None and name in imagenet_model_dict:
        return imagenet_model_dict[name][0]
    if name not in zoo:
        hint = did_you_mean(name, zoo)
        raise MdistillerError(f"unknown model {name!r}{hint}; {label} models: {', '.join(zoo)}")
    return zoo[name][0]


def build_model(name: str, num_classes: int, dataset_type: str | None = None, image_size: int = 224) -> nn.Module:
    """A fresh zoo model (ImageNet models are built for `image_size` inputs; only the ViTs depend on it)."""
    builder = model_builder(name, dataset_type)
    if is_imagenet(dataset_type) or (dataset_type is None and name not in cifar_model_dict):
        return builder(num_classes=num_classes, image_size=image_size)
    return builder(num_classes=num_classes)


def is_detection(cfg) -> bool:
    """Whether DATASET.TYPE is detection data (its models are detectors: detection/models.py)."""
    return DATASETS.get(cfg.DATASET.TYPE).task == "detection"


def check_models(cfg, requires_teacher: bool) -> None:
    """The student's (and, when the method distils, the teacher's) name is one the data's zoo builds."""
    if is_detection(cfg):
        check_detection_models(cfg, requires_teacher)
        weights = cfg.DETECTION.STUDENT_WEIGHTS
        if weights and not os.path.isfile(os.path.expanduser(weights)):
            raise MdistillerError(f"DETECTION.STUDENT_WEIGHTS {weights} not found: put the student backbone's "
                                  f"ImageNet weights there (docs/detection.md), or set it \"\" for a random backbone")
        return
    model_builder(cfg.DISTILLER.STUDENT, cfg.DATASET.TYPE)
    if requires_teacher:
        model_builder(cfg.DISTILLER.TEACHER, cfg.DATASET.TYPE)


def teacher_checkpoint_path(cfg) -> str:
    """DISTILLER.TEACHER_CKPT when set, else the zoo's published path for DISTILLER.TEACHER (detection: there is no
    zoo, DISTILLER.TEACHER_CKPT is required)."""
    if is_detection(cfg):
        return teacher_weights_path(cfg)
    if cfg.DISTILLER.TEACHER_CKPT:
        return resolve_project_path(cfg.DISTILLER.TEACHER_CKPT)
    if is_imagenet(cfg.DATASET.TYPE):
        return imagenet_teacher_path(zoo_name(cfg.DISTILLER.TEACHER, cfg.DATASET.TYPE))
    name = zoo_name(cfg.DISTILLER.TEACHER, cfg.DATASET.TYPE)
    model_builder(name, cfg.DATASET.TYPE)
    zoo, _, vanilla = small_image_zoo(cfg.DATASET.TYPE)
    zoo_path = zoo[name][1]
    if zoo_path is None:
        raise MdistillerError(
            f"the zoo has no published checkpoint for teacher {name}: train one with {vanilla}/{name}.yaml (or a "
            f"vanilla config with DISTILLER.STUDENT {name}) and pass DISTILLER.TEACHER_CKPT <its student_best>"
        )
    path = resolve_project_path(zoo_path)
    if not os.path.isfile(path):
        if cfg.DATASET.TYPE == "tiny_imagenet":
            raise MdistillerError(
                f"teacher checkpoint not found: {zoo_path}. Train it with {vanilla}/{name}.yaml and copy its "
                f"student_best there (see docs/tiny_imagenet.md), or pass DISTILLER.TEACHER_CKPT <path>"
            )
        raise MdistillerError(
            f"teacher checkpoint not found: {zoo_path}. {DOWNLOAD_TEACHERS_HINT} "
            f"(mdistiller-download-ckpts; see download_ckpts/README.md), or pass DISTILLER.TEACHER_CKPT <path>"
        )
    return path


def imagenet_teacher_path(name: str) -> str:
    """The ImageNet teacher file of `name` in download_ckpts/imagenet_teachers/ (<name>.pth or a published name)."""
    model_builder(name, "imagenet")
    if imagenet_model_dict[name][1] is None:
        raise MdistillerError(
            f"the ImageNet zoo has no teacher file for {name}: pass DISTILLER.TEACHER_CKPT <a trained {name}'s weights>"
        )
    found = find_imagenet_teacher(name, resolve_project_path)
    if found is None:
        published = [os.path.basename(p) for p in teacher_file_candidates(name)[1:]]
        also = f" (or the published {' / '.join(published)} there)" if published else ""
        raise MdistillerError(
            f"teacher checkpoint not found for {name}: put its weights at {IMAGENET_TEACHER_DIR}/{name}.pth{also}, "
            f"see {IMAGENET_TEACHER_DIR}/README.md; or pass DISTILLER.TEACHER_CKPT <path>"
        )
    return found


def teacher_home(name: str, dataset_type: str | None = None) -> str:
    """Where the zoo looks for `name`'s teacher weights: mdistiller's CIFAR layout or the ImageNet teacher folder."""
    if is_imagenet(dataset_type):
        return f"{IMAGENET_TEACHER_DIR}/{zoo_name(name, dataset_type)}.pth"
    published = small_image_zoo(dataset_type)[0].get(name, (None, None))[1]
    if dataset_type == "tiny_imagenet":
        return published or f"download_ckpts/tiny_imagenet_teachers/{name}_vanilla/student_best"
    return published or f"download_ckpts/cifar_teachers/{name}_vanilla/ckpt_epoch_240.pth"


def pretrained_checkpoint_path(name: str, dataset_type: str | None = None) -> str:
    """The zoo's published weights for `name` (what `-c pretrain` means in the tools)."""
    if is_imagenet(dataset_type):
        return imagenet_teacher_path(zoo_name(name, dataset_type))
    model_builder(name, dataset_type)
    zoo_path = small_image_zoo(dataset_type)[0][name][1]
    if zoo_path is None:
        raise MdistillerError(f"the zoo has no published checkpoint for {name}; pass a checkpoint file with -c")
    path = resolve_project_path(zoo_path)
    if not os.path.isfile(path):
        hint = DOWNLOAD_TEACHERS_HINT if dataset_type != "tiny_imagenet" else "See docs/tiny_imagenet.md"
        raise MdistillerError(f"published checkpoint not found: {zoo_path}. {hint}")
    return path


def load_zoo_model(name: str, ckpt: str, num_classes: int, dataset_type: str | None = None, image_size: int = 224,
                   what: str = "checkpoint") -> tuple[nn.Module, str]:
    """A zoo model holding the weights of `ckpt` (a file, or "pretrain": the published ones), and that path."""
    model_builder(name, dataset_type)
    path = pretrained_checkpoint_path(name, dataset_type) if ckpt == "pretrain" else ckpt
    model = build_model(name, num_classes, dataset_type, image_size)
    load_model_weights(model, path, name, num_classes, what)
    return model, path


def build_teacher(cfg, num_classes: int) -> nn.Module:
    """The teacher with its checkpoint loaded, in eval mode."""
    teacher = build_model(cfg.DISTILLER.TEACHER, num_classes, cfg.DATASET.TYPE, cfg.DATASET.IMAGE_SIZE)
    load_model_weights(teacher, teacher_checkpoint_path(cfg), cfg.DISTILLER.TEACHER, num_classes, "teacher checkpoint")
    return teacher.eval()


# What the builder can pass a distiller's constructor by keyword when its declaration lists the name in build_needs.
BUILD_FACTS = (
    "num_data",  # the training-set size (CRD's memory rows)
)


def build_kwargs(distiller_class, num_data: int | None = None) -> dict:
    """The constructor keyword arguments `distiller_class` declares in `build_needs`, from the facts given (one-line
    errors for a need the builder does not know or was not given)."""
    facts = {"num_data": num_data}
    kwargs = {}
    for name in distiller_class.declares.build_needs:
        if name not in BUILD_FACTS:
            raise MdistillerError(f"{distiller_class.__name__} needs {name!r} to be built, which the builder does not "
                                  f"provide (it provides {', '.join(BUILD_FACTS)})")
        if facts[name] is None:
            raise MdistillerError(f"{distiller_class.__name__} needs {name} to be built (the training set must be "
                                  f"built first)")
        kwargs[name] = facts[name]
    return kwargs


def build_distiller(cfg, num_classes: int, num_data: int | None = None, random_teacher: bool = False):
    """Student, (teacher) and the distiller of DISTILLER.TYPE; `num_data` (the training-set size) is passed to a
    distiller that declares it in `build_needs` (CRD). random_teacher: the teacher keeps its random initial weights,
    no checkpoint read (tools/bench.py: a step costs the same time whatever the weights)."""
    distiller_class = get_distiller_class(cfg.DISTILLER.TYPE)
    kwargs = build_kwargs(distiller_class, num_data)
    if is_detection(cfg):
        student = build_detection_student(cfg)
        teacher = (build_detection_teacher(cfg, random_weights=random_teacher)
                   if distiller_class.declares.requires_teacher else None)
        return distiller_class(student, teacher, cfg, **kwargs)
    student = build_model(cfg.DISTILLER.STUDENT, num_classes, cfg.DATASET.TYPE, cfg.DATASET.IMAGE_SIZE)
    teacher = None
    if distiller_class.declares.requires_teacher and random_teacher:
        teacher = build_model(cfg.DISTILLER.TEACHER, num_classes, cfg.DATASET.TYPE, cfg.DATASET.IMAGE_SIZE).eval()
    elif distiller_class.declares.requires_teacher:
        teacher = build_teacher(cfg, num_classes)
    return distiller_class(student, teacher, cfg, **kwargs)


def apply_logit_stand_flags(cfg, base_temp: float, kd_weight: float) -> None:
    """`--logit-stand --base-temp τ --kd-weight w`: switch LS on and let the method map τ and w onto its keys."""
    declares = get_distiller_class(cfg.DISTILLER.TYPE).declares
    if declares.logit_stand is None:
        raise MdistillerError(declares.logit_stand_refusal or f"--logit-stand applies to logit methods; "
                              f"DISTILLER.TYPE {cfg.DISTILLER.TYPE} is not one")
    declares.logit_stand(cfg, base_temp, kd_weight)
    cfg.EXPERIMENT.LOGIT_STAND = True
    cfg.EXPERIMENT.BASE_TEMP = float(base_temp)
    cfg.EXPERIMENT.KD_WEIGHT = float(kd_weight)
