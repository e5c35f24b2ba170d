"""The detection task through tools/train.py, as a user runs it: configs/coco/DKD-R18-R101.yaml on a synthetic COCO
folder in detectron2's layout (tiny images, a few iterations) with a model-zoo style teacher .pkl trains, evaluates
with COCO box AP, logs and appends its result; the loss goes down; its student_best evaluates with tools/eval.py.
The other recipes: test_detection_recipes.py; resume and torchrun: test_detection_resume.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mdistiller.cli import train as train_tool
from mdistiller.engine import worklog

from conftest import run_tool
from detection_runs import COCO_CONFIGS, run_dir_of, tiny

pytest.importorskip("pycocotools")
pytestmark = pytest.mark.usefixtures("drop_run_files")


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


def test_the_loss_goes_down(tmp_path, coco):
    """16 iterations of DKD-R18-R101 (an R50 teacher: cheaper) at one scale: each period's mean loss is below the one
    before, the last one well below the first."""
    args = tiny(tmp_path, coco, "R50-FPN", 16, 4, "R18-FPN", **{
        "DISTILLER.TEACHER": "R50-FPN", "SOLVER.WARMUP_ITERS": "2", "DETECTION.MIN_SIZE_TRAIN": "(32,)",
        "SOLVER.LR_DECAY_ITERS": "[]"})
    train_tool.main(["--cfg", str(COCO_CONFIGS / "DKD-R18-R101.yaml"), *args])
    losses = [b["train_loss"] for b in worklog.read(str(run_dir_of(tmp_path)))]
    assert len(losses) == 4 and all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0], losses


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
