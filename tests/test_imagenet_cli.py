"""tools/train.py and tools/eval.py on a tiny ImageNet folder of real JPEGs, as a user runs them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision
from test_imagenet_data import write_imagenet

from conftest import REPO, run_overrides, run_tool

pytestmark = pytest.mark.slow  # subprocesses / multi-process runs: the full suite runs them, `-m "not slow"` skips them

KD = str(REPO / "configs/imagenet/r34_r18/kd.yaml")
VKD = str(REPO / "configs/imagenet/r34_r18/vkd.yaml")


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory) -> str:
    """3 classes, 8 train / 4 val JPEGs of 40x40 px each."""
    return write_imagenet(str(tmp_path_factory.mktemp("tiny_imagenet")))


@pytest.fixture(scope="module")
def torchvision_teacher(tmp_path_factory) -> str:
    """A random-init ResNet18 (3 classes) saved as torchvision saves its weights: a bare state dict."""
    folder = tmp_path_factory.mktemp("imagenet_teachers")
    torch.manual_seed(0)
    path = folder / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), path)
    return str(path)


def _overrides(tmp: Path, root: str) -> list[str]:
    """Small runs: 32 px crops of the 40 px images, 3 batches of 8, the data set's own class count."""
    return run_overrides(tmp, root) + ["DATASET.IMAGE_SIZE", "32", "DATASET.NUM_CLASSES", "0",
                                       "SOLVER.BATCH_SIZE", "8", "DATASET.TEST.BATCH_SIZE", "12",
                                       "DISTILLER.TEACHER", "ResNet18"]


def _run_dir(tmp: Path) -> Path:
    (run_dir,) = [p for p in (tmp / "output").glob("*/*") if p.is_dir()]
    return run_dir


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory, tiny_imagenet, torchvision_teacher):
    tmp = tmp_path_factory.mktemp("kd_run")
    result = run_tool("train.py", "--cfg", KD, *_overrides(tmp, tiny_imagenet),
                      "DISTILLER.TEACHER_CKPT", torchvision_teacher)
    return tmp, result


def test_kd_trains_an_epoch_on_imagenet_folders(kd_run):
    tmp, result = kd_run
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = _run_dir(tmp)
    assert run_dir.parent.name == "imagenet_baselines"
    worklog = (run_dir / "worklog.txt").read_text()
    assert re.search(r"^loss_kd: [\d.]+$", worklog, re.M) and re.search(r"^test_acc: [\d.]+$", worklog, re.M)
    assert "24 training images, 3 classes" in result.stdout
    student = torch.load(run_dir / "student_best", weights_only=False)
    assert student["arch"] == "ResNet18" and student["model"]["fc.weight"].shape == (3, 512)
    assert "best_top1=" in (tmp / "logs" / "KD,ResNet18,ResNet18.txt").read_text()


def test_eval_tool_evaluates_an_imagenet_student(kd_run, tiny_imagenet):
    tmp, _ = kd_run
    result = run_tool("eval.py", "-d", "imagenet", "-m", "ResNet18", "-c", str(_run_dir(tmp) / "student_best"),
                      "--data-root", tiny_imagenet, "--image-size", "32", "--num-workers", "0", "-bs", "12")
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"ResNet18 .*student_best on imagenet: top-1 [\d.]+ +top-5 100\.00", result.stdout)


def test_eval_tool_finds_torchvisions_file_as_pretrain(tmp_path, tiny_imagenet, torchvision_teacher):
    folder = tmp_path / "download_ckpts" / "imagenet_teachers"
    folder.mkdir(parents=True)
    (folder / "resnet18-f37072fd.pth").write_bytes(Path(torchvision_teacher).read_bytes())
    result = run_tool("eval.py", "-d", "imagenet", "-m", "ResNet18", "-c", "pretrain", "--data-root", tiny_imagenet,
                      "--image-size", "32", "--num-workers", "0", cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resnet18-f37072fd.pth on imagenet: top-1" in result.stdout


def test_vkd_feature_method_trains_an_epoch(tmp_path, tiny_imagenet, torchvision_teacher):
    result = run_tool("train.py", "--cfg", VKD, *_overrides(tmp_path, tiny_imagenet),
                      "DISTILLER.TEACHER_CKPT", torchvision_teacher, "VKD.INPUT_SIZE", "(32, 32)")
    assert result.returncode == 0, result.stderr[-2000:]
    worklog = (_run_dir(tmp_path) / "worklog.txt").read_text()
    assert re.search(r"^loss_feat: [\d.]+$", worklog, re.M)
    assert "extra parameters 262144" in result.stdout  # the 512 x 512 orthogonal projection


def test_missing_imagenet_folder_is_one_line_and_exit_2(tmp_path):
    result = run_tool("train.py", "--cfg", KD, *run_overrides(tmp_path, str(tmp_path / "nowhere")))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "error: ImageNet not found: no folder" in result.stderr
