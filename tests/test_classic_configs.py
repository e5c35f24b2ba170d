"""FITNET / VID / OFD / REVIEWKD configs: the pairs shipped, their recipe and headers, every file builds its
distiller (ReviewKD's lists checked against the models there), the ImageNet files are upstream's, and upstream's four
CIFAR files train one epoch through the CLI entry point."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from mdistiller.distillers import get_distiller_class
from mdistiller.distillers.reviewkd import LIST_KEYS, reviewkd_lists
from mdistiller.engine.build import build_model
from mdistiller.engine.cfg import cfg_to_dict, load_cfg, validate_cfg
from mdistiller.engine.checkpoint import load_checkpoint
from mdistiller.errors import MdistillerError

from conftest import run_overrides

REPO = Path(__file__).resolve().parents[1]
METHODS = ("fitnet", "vid", "ofd", "reviewkd")
CIFAR = sorted(p for m in METHODS for p in (REPO / "configs" / "cifar100" / m).glob("*.yaml"))
IMAGENET = [REPO / "configs/imagenet" / f
            for f in ("r50_mv1/ofd.yaml", "r34_r18/reviewkd.yaml", "r50_mv1/reviewkd.yaml")]
UPSTREAM = Path(__file__).parent / "data" / "reference_configs" / "mdistiller" / "configs"
# spec/classic.md section 15: the pairs of the published tables
PAIRS = {"wrn_40_2_wrn_16_2", "wrn_40_2_wrn_40_1", "resnet56_resnet20", "resnet110_resnet20", "resnet110_resnet32",
         "resnet32x4_resnet8x4", "vgg13_vgg8", "vgg13_MobileNetV2", "ResNet50_MobileNetV2", "ResNet50_vgg8",
         "resnet32x4_ShuffleV1", "resnet32x4_ShuffleV2", "wrn_40_2_ShuffleV1"}
LOW_LR_STUDENTS = {"MobileNetV2", "ShuffleV1", "ShuffleV2"}
# the shipped pairs that build fast enough for the quick loop; the others are in the slow sweep
QUICK = {"resnet32x4_resnet8x4", "wrn_40_2_ShuffleV1", "vgg13_MobileNetV2"}


def _id(path: Path) -> str:
    return "/".join(path.parts[-2:])


def test_each_method_ships_the_pairs_it_supports():
    for method in METHODS:
        names = {p.stem for p in (REPO / "configs" / "cifar100" / method).glob("*.yaml")}
        # OFD: MobileNetV2 has no pre-activation features (upstream cannot use it as an OFD student either)
        expected = {p for p in PAIRS if not p.endswith("MobileNetV2")} if method == "ofd" else PAIRS
        assert names == expected, method


@pytest.mark.parametrize("path", CIFAR, ids=_id)
def test_cifar_config_recipe_and_header(path):
    cfg = load_cfg(str(path))
    validate_cfg(cfg)
    assert cfg.DISTILLER.TYPE == path.parent.name.upper()
    assert path.stem == f"{cfg.DISTILLER.TEACHER}_{cfg.DISTILLER.STUDENT}"
    assert (cfg.SOLVER.BATCH_SIZE, cfg.SOLVER.EPOCHS, cfg.SOLVER.WEIGHT_DECAY) == (64, 240, 0.0005)
    assert cfg.SOLVER.LR_DECAY_STAGES == [150, 180, 210] and cfg.SOLVER.LR_DECAY_RATE == 0.1
    assert cfg.SOLVER.LR == (0.01 if cfg.DISTILLER.STUDENT in LOW_LR_STUDENTS else 0.05)
    header = path.read_text().split("EXPERIMENT:")[0]
    assert "# Published top-1" in header
    if cfg.DISTILLER.TYPE == "REVIEWKD":
        assert cfg.REVIEWKD.REVIEWKD_WEIGHT == 5.0 and "reviewkd_lists(student, teacher, (32, 32))" in header


@pytest.mark.parametrize("path", IMAGENET, ids=lambda p: "/".join(p.parts[-2:]))
def test_imagenet_configs_are_upstream_s_files(path):
    ours = load_cfg(str(path))
    validate_cfg(ours)
    upstream = load_cfg(str(UPSTREAM / "imagenet" / path.parent.name / path.name),
                        ["DATASET.NUM_CLASSES", "1000", "DATASET.IMAGE_SIZE", "224"])  # what ours adds: checks only
    assert cfg_to_dict(ours) == cfg_to_dict(upstream)


def _build(path: Path):
    cfg = load_cfg(str(path))
    num_classes = 1000 if cfg.DATASET.TYPE == "imagenet" else 100
    torch.manual_seed(0)
    student = build_model(cfg.DISTILLER.STUDENT, num_classes, cfg.DATASET.TYPE, cfg.DATASET.IMAGE_SIZE)
    teacher = build_model(cfg.DISTILLER.TEACHER, num_classes, cfg.DATASET.TYPE, cfg.DATASET.IMAGE_SIZE)
    return cfg, get_distiller_class(cfg.DISTILLER.TYPE)(student, teacher.eval(), cfg)


BUILDS = [pytest.param(p, id=_id(p), marks=() if p.stem in QUICK else pytest.mark.slow) for p in CIFAR] + [
    pytest.param(p, id="imagenet/" + _id(p), marks=pytest.mark.slow) for p in IMAGENET]


@pytest.mark.parametrize("path", BUILDS)
def test_config_builds_its_distiller(path, one_thread):
    """Building is also where ReviewKD checks its lists against the models (refused in one line otherwise)."""
    cfg, distiller = _build(path)
    assert distiller.get_extra_parameters() > 0
    if cfg.DISTILLER.TYPE == "REVIEWKD":
        size = (cfg.DATASET.IMAGE_SIZE,) * 2 if cfg.DATASET.TYPE == "imagenet" else (32, 32)
        lists = reviewkd_lists(distiller.student, distiller.teacher, size, cfg.REVIEWKD.STU_PREACT)
        assert lists == {key: list(cfg.REVIEWKD[key]) for key in LIST_KEYS}


def test_upstream_reviewkd_file_with_another_pair_says_which_lists_to_use(one_thread):
    cfg = load_cfg(str(UPSTREAM / "cifar100/reviewkd.yaml"), ["DISTILLER.TEACHER", "wrn_40_2",
                                                              "DISTILLER.STUDENT", "wrn_16_2"])
    student, teacher = build_model("wrn_16_2", 100), build_model("wrn_40_2", 100)
    with pytest.raises(MdistillerError, match=r"REVIEWKD.IN_CHANNELS \[32,64,128,128\] "
                                              r"REVIEWKD.OUT_CHANNELS \[32,64,128,128\]$"):
        get_distiller_class("REVIEWKD")(student, teacher, cfg)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_upstream_cifar_config_trains_one_epoch(method, tmp_path, cifar100_tiny_root, teacher_ckpt):
    """Upstream's configs/cifar100/<method>.yaml, unchanged (resnet32x4 -> resnet8x4), through the CLI entry point."""
    train = importlib.import_module("mdistiller.cli.train")
    result = train.main(["--cfg", str(UPSTREAM / "cifar100" / f"{method}.yaml"),
                         "DISTILLER.TEACHER_CKPT", teacher_ckpt("resnet32x4"), "DATASET.TEST.BATCH_SIZE", "32",
                         *run_overrides(tmp_path, cifar100_tiny_root)])
    run_dir = Path(result["run_dir"])
    worklog = (run_dir / "worklog.txt").read_text()
    assert "loss_kd" in worklog and "loss_ce" in worklog
    state = load_checkpoint(str(run_dir / "latest"))["model"]
    extra = {"fitnet": "conv_reg.", "vid": "regressors.", "ofd": "connectors.connectors.", "reviewkd": "abfs."}[method]
    assert any(k.startswith(extra) for k in state)
    assert not any("margin" in k or "log_scale" in k for k in state)
    if method == "ofd":  # the teacher trained in train mode: its BN statistics moved from the checkpoint's
        saved = torch.load(teacher_ckpt("resnet32x4"), map_location="cpu")["model"]
        assert not torch.equal(state["teacher.bn1.running_mean"], saved["bn1.running_mean"])
        assert torch.equal(state["teacher.conv1.weight"], saved["conv1.weight"])
