"""The Tiny-ImageNet configs train through tools/train.py's main on a small Tiny-ImageNet of real JPEGs, and
tools/eval.py -d tiny_imagenet evaluates what they wrote."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from test_tiny_imagenet_data import write_tiny_imagenet

from mdistiller.cli import eval as eval_tool
from mdistiller.cli import train as train_tool
from mdistiller.errors import MdistillerError
from mdistiller.models import tiny_imagenet_model_dict

from conftest import REPO, run_overrides

DOT_CONFIGS = {"MobileNetV2": "configs/tiny_imagenet/dot/r18_mv2.yaml",
               "ShuffleV2": "configs/tiny_imagenet/dot/r18_shuv2.yaml"}
VANILLA = "configs/tiny_imagenet/vanilla/ResNet18.yaml"
# Overrides of SOLVER.TRAINER for these runs: none, the configs train with DOT as published.
TRAINER_OVERRIDE: tuple[str, ...] = ()


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> str:
    """4 classes, 1 train / 1 val 64 px JPEG each, in the official zip's layout (64 px models are slow on a CPU)."""
    return write_tiny_imagenet(str(tmp_path_factory.mktemp("tiny_imagenet")), n_train=1, n_val=1)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A random-init Tiny-ImageNet ResNet18 (4 classes) in mdistiller's student_best format."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "ti_res18"
    torch.save({"model": tiny_imagenet_model_dict["ResNet18"][0](num_classes=4).state_dict()}, path)
    return str(path)


def _overrides(tmp: Path, root: str) -> list[str]:
    """One epoch of one batch of 4 on the 4-class set (the configs say 200 classes: take the data's count)."""
    return run_overrides(tmp, root) + ["DATASET.NUM_CLASSES", "0", "SOLVER.BATCH_SIZE", "4",
                                       "DATASET.TEST.BATCH_SIZE", "4"]


# ~4 s of CPU per run; the ShuffleV2 config's run is left to the slow suite
@pytest.fixture(scope="module", params=["MobileNetV2", pytest.param("ShuffleV2", marks=pytest.mark.slow)])
def dot_run(request, tmp_path_factory, tiny_root, teacher):
    student = request.param
    tmp = tmp_path_factory.mktemp(f"dot_{student}")
    result = train_tool.main(["--cfg", str(REPO / DOT_CONFIGS[student]), *_overrides(tmp, tiny_root),
                              "DISTILLER.TEACHER_CKPT", teacher, *TRAINER_OVERRIDE])
    return student, Path(result["run_dir"]), result


def test_dot_config_trains_an_epoch_of_kd_on_tiny_imagenet(dot_run):
    student, run_dir, result = dot_run
    assert run_dir.parent.name == "dot_tinyimagenet"
    worklog = (run_dir / "worklog.txt").read_text()
    assert re.search(r"^loss_kd: [\d.]+$", worklog, re.M) and re.search(r"^loss_ce: [\d.]+$", worklog, re.M)
    config = (run_dir / "config.yaml").read_text()
    assert "TYPE: tiny_imagenet" in config and f"STUDENT: {student}" in config
    saved = torch.load(run_dir / "student_best", weights_only=False)
    assert saved["arch"] == student
    head = {"MobileNetV2": ("conv2.weight", (4, 1280, 1, 1)), "ShuffleV2": ("linear.weight", (4, 1024))}[student]
    assert tuple(saved["model"][head[0]].shape) == head[1]
    assert 0.0 <= result["best_acc"] <= 100.0


def test_eval_tool_reports_the_runs_test_accuracy(dot_run, tiny_root, capsys):
    student, run_dir, result = dot_run
    got = eval_tool.main(["-d", "tiny_imagenet", "-m", student, "-c", str(run_dir / "student_best"),
                          "--data-root", tiny_root, "--num-workers", "0", "-bs", "4"])
    assert got["top1"] == pytest.approx(result["best_acc"], abs=1e-3)  # the same 4 images, the same weights
    assert re.search(rf"{student} .*student_best on tiny_imagenet: top-1 [\d.]+ +top-5 100\.00",
                     capsys.readouterr().out)


@pytest.mark.slow  # a 64 px ResNet18 trained, then a distillation run
def test_vanilla_teacher_config_trains_and_its_weights_serve_as_the_teacher(tmp_path, tiny_root, capsys):
    result = train_tool.main(["--cfg", str(REPO / VANILLA), *_overrides(tmp_path / "t", tiny_root)])
    weights = Path(result["run_dir"]) / "student_best"
    assert "download_ckpts/tiny_imagenet_teachers/ResNet18_vanilla/ti_res18" in capsys.readouterr().out
    distilled = train_tool.main(["--cfg", str(REPO / DOT_CONFIGS["ShuffleV2"]), *_overrides(tmp_path / "s", tiny_root),
                                 "DISTILLER.TEACHER_CKPT", str(weights), *TRAINER_OVERRIDE])
    assert Path(distilled["run_dir"], "student_best").is_file()


def test_missing_data_set_is_one_clear_error(tmp_path, teacher):
    with pytest.raises(MdistillerError, match="Tiny-ImageNet not found: no folder .*tiny-imagenet-200"):
        train_tool.main(["--cfg", str(REPO / DOT_CONFIGS["MobileNetV2"]), *_overrides(tmp_path, str(tmp_path)),
                         "DISTILLER.TEACHER_CKPT", teacher])
