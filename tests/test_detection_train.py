"""The detection task through tools/train.py, as a user runs it: the configs/coco recipes on a synthetic COCO folder in
detectron2's layout (tiny images, a few iterations), with teachers from model-zoo style .pkl files; the loss goes
down, the run evaluates with COCO box AP, logs and appends its result, resumes exactly after SIGTERM mid-period, runs
under torchrun (gloo), and its student_best evaluates with tools/eval.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mdistiller.cli import train as train_tool
from mdistiller.distillers import get_distiller_class
from mdistiller.engine import worklog
from mdistiller.engine.cfg import load_cfg

from coco_files import write_coco_split
from conftest import REPO, THREADS, needs_gloo, run_tool, run_torchrun
from detectron2_files import write_bundled_student, write_teacher_pkl

pytest.importorskip("pycocotools")

COCO_CONFIGS = REPO / "configs" / "coco"


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> dict[str, str]:
    """A COCO root (train: 10 images, 8 trainable; val: 6) and model-zoo style R101 / R50 teacher files."""
    root = tmp_path_factory.mktemp("coco")
    write_coco_split(str(root), "train", n_images=10, seed=0)
    write_coco_split(str(root), "val", n_images=6, seed=1)
    weights = tmp_path_factory.mktemp("weights")
    return {"root": str(root), "R101-FPN": write_teacher_pkl(weights / "r101.pkl", "R101", seed=1),
            "R50-FPN": write_teacher_pkl(weights / "r50.pkl", "R50", seed=2),
            "student R18-FPN": write_bundled_student(weights / "r18-r101.pth", "R18", seed=3),
            "student R50-FPN": write_bundled_student(weights / "r50-r101.pth", "R50", seed=4)}


def tiny(tmp: Path, coco: dict, teacher: str | None, max_iter: int = 4, period: int = 2, student: str = "",
         **extra: str) -> list[str]:
    """Overrides that shrink a configs/coco recipe to tiny images and a few iterations, files inside tmp; the student
    backbone from a bundle (R18 / R50-FPN) or random (MV2-FPN, or no `student`)."""
    values = {"DETECTION.STUDENT_WEIGHTS": coco.get(f"student {student}", ""),
        "DATASET.ROOT": coco["root"], "DATASET.NUM_WORKERS": "0", "DETECTION.TRAIN_SPLIT": "train",
        "DETECTION.TEST_SPLIT": "val", "DETECTION.MIN_SIZE_TRAIN": "(32, 48)",
        "DETECTION.MAX_SIZE_TRAIN": "128",
        "DETECTION.MIN_SIZE_TEST": "32", "DETECTION.MAX_SIZE_TEST": "128", "SOLVER.MAX_ITER": str(max_iter),
        "SOLVER.CHECKPOINT_PERIOD": str(period), "SOLVER.LR_DECAY_ITERS": f"[{max_iter - 1}]" if max_iter > 1 else "[]",
        "SOLVER.WARMUP_ITERS": "1", "SOLVER.BATCH_SIZE": "2", "LOG.PREFIX": str(tmp / "output"),
        "LOG.RESULTS_DIR": str(tmp / "logs"),
        "LOG.SAVE_CHECKPOINT_FREQ": "1000",  # a detector checkpoint is ~230 MB: no numbered ones unless asked
        **extra,
    }
    if teacher is not None:
        values["DISTILLER.TEACHER_CKPT"] = coco[teacher]
    return [item for pair in values.items() for item in pair]


def run_dir_of(tmp: Path) -> Path:
    (folder,) = (tmp / "output" / "coco").iterdir()
    return folder


def roles(config: Path) -> dict[str, str | None]:
    """The config's DISTILLER.TEACHER (None when its method distils from none) and DISTILLER.STUDENT."""
    cfg = load_cfg(str(config))
    distils = get_distiller_class(cfg.DISTILLER.TYPE).declares.requires_teacher
    return {"teacher": cfg.DISTILLER.TEACHER if distils else None, "student": cfg.DISTILLER.STUDENT}


def test_dkd_r18_r101_trains_evaluates_and_records(tmp_path, coco):
    config = COCO_CONFIGS / "DKD-R18-R101.yaml"
    result = train_tool.main(["--cfg", str(config), *tiny(tmp_path, coco, "R101-FPN", student="R18-FPN", **{
        "LOG.SAVE_CHECKPOINT_FREQ": "1"})])
    run_dir = run_dir_of(tmp_path)
    assert Path(result["run_dir"]) == run_dir
    blocks = worklog.read(str(run_dir))
    assert [b["epoch"] for b in blocks] == [1, 2]
    for name in ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_dkd", "train_loss"):
        assert all(torch.isfinite(torch.tensor(b[name])) for b in blocks), name
    assert "test_AP" not in blocks[0] and "test_AP" in blocks[1]  # EVAL_PERIOD 0: at the end only
    assert 0.0 <= blocks[1]["test_AP"] <= 100.0
    (line,) = (tmp_path / "logs" / "RCNN_DKD,R101-FPN,R18-FPN.txt").read_text().splitlines()
    assert line.startswith(f"best_AP={blocks[1]['test_AP']:.4f}\tlast_AP=") and "\titers=4\t" in line
    assert sorted(os.listdir(run_dir)) == sorted([  # a numbered checkpoint every period, as detectron2's
        "config.yaml", "identity.json", "log.txt", "worklog.txt", "train.events", "latest", "best", "student_best",
        "student_latest", "epoch_1", "epoch_2", "student_1", "student_2"])
    log = (run_dir / "log.txt").read_text()
    assert "iteration 2/4" in log and "iteration 4/4" in log and "box AP" in log


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(p.name for p in COCO_CONFIGS.glob("*.yaml")))
def test_every_coco_recipe_runs_a_few_iterations(tmp_path, coco, config):
    path = COCO_CONFIGS / config
    train_tool.main(["--cfg", str(path), *tiny(tmp_path, coco, max_iter=1, period=1, **roles(path))])
    (block,) = worklog.read(str(run_dir_of(tmp_path)))
    assert torch.isfinite(torch.tensor(block["train_loss"])) and "test_AP" in block


def test_the_loss_goes_down(tmp_path, coco):
    """16 iterations of DKD-R18-R101 (an R50 teacher: cheaper) at one scale: each period's mean loss is below the one
    before, the last one well below the first."""
    args = tiny(tmp_path, coco, "R50-FPN", 16, 4, "R18-FPN", **{
        "DISTILLER.TEACHER": "R50-FPN", "SOLVER.WARMUP_ITERS": "2", "DETECTION.MIN_SIZE_TRAIN": "(32,)",
        "SOLVER.LR_DECAY_ITERS": "[]"})
    train_tool.main(["--cfg", str(COCO_CONFIGS / "DKD-R18-R101.yaml"), *args])
    losses = [b["train_loss"] for b in worklog.read(str(run_dir_of(tmp_path)))]
    assert len(losses) == 4 and all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0], losses


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(THREADS), PYTHONUNBUFFERED="1")
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, str(REPO / "tools" / "train.py"), *args], cwd=str(REPO), env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def _student(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "student_latest", weights_only=False)["model"]


@pytest.mark.slow
def test_sigterm_mid_period_then_resume_is_bitwise_exact(tmp_path, coco):
    config = str(COCO_CONFIGS / "ReviewDKD-R18-R101.yaml")
    common = ["EXPERIMENT.DETERMINISTIC", "True", "DISTILLER.TEACHER", "R50-FPN"]  # an R50 teacher: cheaper
    reference_tmp = tmp_path / "reference"
    result = run_tool("train.py", "--cfg", config, *tiny(reference_tmp, coco, "R50-FPN", 6, 3, "R18-FPN"),
                      *common)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = _student(run_dir_of(reference_tmp))

    run_tmp = tmp_path / "stopped"
    args = ["--cfg", config, *tiny(run_tmp, coco, "R50-FPN", 6, 3, "R18-FPN"), *common]
    log = tmp_path / "train.log"
    proc = _start(args, log)
    deadline = time.time() + 300
    while not list((run_tmp / "output").rglob("latest")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)  # into period 2 (or still at period 1's end: both are checked)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 143, log.read_text()[-3000:]
    run_dir = run_dir_of(run_tmp)
    latest = torch.load(run_dir / "latest", weights_only=False)
    hint = next(line for line in log.read_text().splitlines() if "interrupted by SIGTERM" in line)
    assert ("partial" in latest and "period 2, step" in hint) or "the end of period" in hint, hint
    resumed = run_tool("train.py", "--resume", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = _student(run_dir)
    assert final.keys() == reference.keys()
    for key in reference:
        assert torch.equal(final[key], reference[key]), key
    assert [b["epoch"] for b in worklog.read(str(run_dir))] == [1, 2]


@pytest.mark.slow
def test_student_best_evaluates_with_tools_eval(tmp_path, coco):
    config = str(COCO_CONFIGS / "Baseline-R18.yaml")
    train_tool.main(["--cfg", config, *tiny(tmp_path, coco, None, 2, student="R18-FPN")])
    run_dir = run_dir_of(tmp_path)
    trained_ap = worklog.read(str(run_dir))[-1]["test_AP"]
    out = tmp_path / "detections.json"
    result = run_tool("eval.py", "-m", "R18-FPN", "-c", str(run_dir / "student_best"), "-d", "coco", "--data-root",
                      coco["root"], "--split", "val", "--min-size", "64", "--max-size", "128", "-bs", "1",
                      "--results-json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"box AP {trained_ap:.2f}" in result.stdout
    assert out.is_file()


@pytest.mark.slow
@needs_gloo
def test_torchrun_two_processes_train_and_evaluate(tmp_path, coco):
    """Two gloo processes, 4 images each step (two per rank): the run trains, evaluates on both ranks' shares and
    rank 0 alone writes the run's files and the one result line."""
    # 2 images a process: kd_trans's BatchNorm needs more than one value per channel on the 1x1 p6 of 32-pixel images
    args = ["--cfg", str(COCO_CONFIGS / "ReviewDKD-R18-R101.yaml"), *tiny(tmp_path, coco, "R101-FPN", 4, 2, "R18-FPN"),
            "SOLVER.BATCH_SIZE", "4"]
    result = run_torchrun(str(REPO / "tools" / "train.py"), *args, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = run_dir_of(tmp_path)
    blocks = worklog.read(str(run_dir))
    assert [b["epoch"] for b in blocks] == [1, 2] and "test_AP" in blocks[1]
    assert all(torch.isfinite(torch.tensor(b["loss_reviewkd"])) for b in blocks)
    assert len((tmp_path / "logs" / "RCNN_REVIEWDKD,R101-FPN,R18-FPN.txt").read_text().splitlines()) == 1
    assert (run_dir / "log.txt").read_text().count("iteration 4/4") == 1
