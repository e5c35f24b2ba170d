"""DKD, MLKD and CTKD through the command line: the LS flags' mapping, every config file, 1-epoch training runs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from mdistiller.distillers import get_distiller_class
from mdistiller.engine.build import build_model
from mdistiller.engine.cfg import load_cfg

from conftest import run_overrides

REPO = Path(__file__).resolve().parents[1]
METHODS = ("dkd", "mlkd", "ctkd")
CONFIGS = sorted(str(p.relative_to(REPO)) for m in METHODS for p in (REPO / "configs" / "cifar100" / m).glob("*.yaml"))
MOBILE_STUDENTS = {"MobileNetV2", "ShuffleV1", "ShuffleV2"}
REFERENCE_MLKD = REPO / "tests/data/reference_configs/logit-standardization-KD/configs/cifar100/mlkd"


def _train_module():
    module = importlib.import_module("mdistiller.cli.train")
    return module


@pytest.fixture(scope="module")
def train_tool():
    return _train_module()


def _cfg(train_tool, *argv: str):
    return train_tool.build_cfg(train_tool.parse_args(list(argv)))


def test_dkd_logit_stand_flags(train_tool) -> None:
    path = str(REPO / "configs/cifar100/dkd/resnet32x4_resnet8x4.yaml")
    plain = _cfg(train_tool, "--cfg", path)
    assert plain.EXPERIMENT.LOGIT_STAND is False and (plain.DKD.ALPHA, plain.DKD.BETA, plain.DKD.T) == (1.0, 8.0, 4.0)
    cfg = _cfg(train_tool, "--cfg", path, "--logit-stand", "--base-temp", "3", "--kd-weight", "15")
    assert cfg.EXPERIMENT.LOGIT_STAND is True
    assert (cfg.DKD.ALPHA, cfg.DKD.BETA, cfg.DKD.T) == (15.0, 120.0, 3.0)
    assert (cfg.DKD.CE_WEIGHT, cfg.DKD.WARMUP) == (1.0, 20)
    # the authors' vgg13 -> vgg8 run: beta 2 before scaling, given as an override (applied before the flags)
    vgg = str(REPO / "configs/cifar100/dkd/vgg13_vgg8.yaml")
    cfg = _cfg(train_tool, "--cfg", vgg, "--logit-stand", "--base-temp", "2", "--kd-weight", "15", "DKD.BETA", "2.0")
    assert (cfg.DKD.ALPHA, cfg.DKD.BETA, cfg.DKD.T) == (15.0, 30.0, 2.0)
    defaults = _cfg(train_tool, "--cfg", path, "--logit-stand")
    assert (defaults.DKD.ALPHA, defaults.DKD.BETA, defaults.DKD.T) == (9.0, 72.0, 2.0)


def test_mlkd_logit_stand_flags(train_tool) -> None:
    path = str(REPO / "configs/cifar100/mlkd/vgg13_vgg8.yaml")
    cfg = _cfg(train_tool, "--cfg", path, "--logit-stand", "--base-temp", "2", "--kd-weight", "6")
    assert cfg.EXPERIMENT.LOGIT_STAND is True
    assert (cfg.KD.TEMPERATURE, cfg.KD.LOSS.KD_WEIGHT, cfg.KD.LOSS.CE_WEIGHT) == (2.0, 6.0, 0.1)


def test_ctkd_logit_stand_flags(train_tool) -> None:
    path = str(REPO / "configs/cifar100/ctkd/resnet32x4_resnet8x4.yaml")
    cfg = _cfg(train_tool, "--cfg", path, "--logit-stand", "--base-temp", "3", "--kd-weight", "12")
    assert cfg.EXPERIMENT.LOGIT_STAND is True
    assert (cfg.KD.LOSS.KD_WEIGHT, cfg.KD.LOSS.CE_WEIGHT, cfg.KD.TEMPERATURE) == (12.0, 0.1, 4.0)
    assert (cfg.CTKD.T_START, cfg.CTKD.T_END) == (1.0, 20.0)  # the learned temperature replaces base-temp
    dkd_base = _cfg(train_tool, "--cfg", path, "--logit-stand", "--kd-weight", "9", "CTKD.BASE", "DKD", "DKD.BETA", "2")
    assert (dkd_base.DKD.ALPHA, dkd_base.DKD.BETA) == (9.0, 18.0)


@pytest.mark.parametrize("config", CONFIGS)
def test_config_loads_and_builds(config: str) -> None:
    cfg = load_cfg(str(REPO / config))
    method = Path(config).parent.name
    assert cfg.DISTILLER.TYPE == method.upper()
    assert get_distiller_class(cfg.DISTILLER.TYPE).declares.logit_stand is not None
    assert Path(config).stem == f"{cfg.DISTILLER.TEACHER}_{cfg.DISTILLER.STUDENT}"
    assert cfg.SOLVER.EPOCHS == 240 and cfg.SOLVER.WEIGHT_DECAY == 0.0005 and cfg.SOLVER.BATCH_SIZE == 64
    assert cfg.SOLVER.LR_DECAY_STAGES == [150, 180, 210]
    mobile = cfg.DISTILLER.STUDENT in MOBILE_STUDENTS
    if method == "mlkd":  # the authors' per-pair LR: 0.025 / 0.01 for small students, with two exceptions
        exceptions = {"vgg13_vgg8": 0.01, "wrn_40_2_MobileNetV2": 0.005}
        assert cfg.SOLVER.LR == exceptions.get(Path(config).stem, 0.01 if mobile else 0.025)
    else:
        assert cfg.SOLVER.LR == (0.01 if mobile else 0.05)
    if method == "ctkd":
        assert (cfg.CTKD.BASE, cfg.KD.LOSS.CE_WEIGHT, cfg.KD.LOSS.KD_WEIGHT) == ("KD", 0.1, 0.9)
    header = (REPO / config).read_text().split("EXPERIMENT:")[0]
    assert "Published top-1" in header and "--logit-stand --base-temp" in header
    with torch.device("meta"):
        student = build_model(cfg.DISTILLER.STUDENT, 100)
        teacher = build_model(cfg.DISTILLER.TEACHER, 100)
    assert next(student.parameters()).is_meta and next(teacher.parameters()).is_meta


def test_fourteen_pairs_per_method() -> None:
    # the logit-standardisation table's pairs: the KD configs that record the authors' LS setting
    kd_pairs = {p.name for p in (REPO / "configs/cifar100/kd").glob("*.yaml") if "--logit-stand" in p.read_text()}
    for method in METHODS:
        assert {p.name for p in (REPO / "configs/cifar100" / method).glob("*.yaml")} == kd_pairs
    assert len(kd_pairs) == 14


def test_reference_mlkd_configs_load() -> None:
    # the logit-standardisation repo's MLKD configs (SOLVER.TRAINER "ours", 480 epochs) load unchanged
    for path in sorted(REFERENCE_MLKD.glob("*.yaml")):
        cfg = load_cfg(str(path))
        assert cfg.DISTILLER.TYPE == "MLKD" and cfg.SOLVER.TRAINER == "ours"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert get_distiller_class("KD_ours") is get_distiller_class("MLKD")


def _run_train(*args: str) -> subprocess.CompletedProcess:
    """conftest's run_tool("train.py", ...) with one intra-op thread: these runs are tiny, and on a loaded 2-core
    machine a second thread makes them several times slower (measured: 1.6 s vs 14.5 s for the same epoch)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "train.py"), *args],
        cwd=str(REPO), env=env, capture_output=True, text=True, timeout=300,
    )


def _train(tmp_path: Path, cifar100_root: str, teacher: str, config: str, *flags: str):
    overrides = ["DISTILLER.TEACHER", "resnet20", "DISTILLER.STUDENT", "resnet8", "DISTILLER.TEACHER_CKPT", teacher]
    args = ["--cfg", str(REPO / config), *flags, *overrides, *run_overrides(tmp_path, cifar100_root)]
    proc = _run_train(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dirs = [p.parent for p in (tmp_path / "output").rglob("worklog.txt")]
    assert len(run_dirs) == 1, run_dirs
    assert (run_dirs[0] / "student_best").is_file()
    return run_dirs[0], (run_dirs[0] / "worklog.txt").read_text()


@pytest.mark.parametrize(
    "config, flags",
    [
        ("configs/cifar100/dkd/resnet32x4_resnet8x4.yaml", ()),
        ("configs/cifar100/dkd/resnet32x4_resnet8x4.yaml", ("--logit-stand", "--base-temp", "2", "--kd-weight", "9")),
        ("configs/cifar100/mlkd/resnet56_resnet20.yaml", ()),
        ("configs/cifar100/ctkd/resnet56_resnet20.yaml", ("--logit-stand",)),
    ],
    ids=["dkd", "dkd-ls", "mlkd", "ctkd-ls"],
)
@pytest.mark.slow
def test_one_epoch_cli_run(config: str, flags: tuple, tmp_path: Path, cifar100_root: str, teacher_ckpt) -> None:
    run_dir, worklog = _train(tmp_path, cifar100_root, teacher_ckpt("resnet20"), config, *flags)
    assert "loss_kd" in worklog
    if "--logit-stand" in flags:
        assert "LS:T2,w9" in run_dir.name
    else:
        assert "LS" not in run_dir.name
    if "mlkd" in config:
        assert "loss_cc" in worklog and "loss_bc" in worklog
    if "ctkd" in config:
        assert "ctkd_temperature" in worklog and "ctkd_lambda" in worklog
