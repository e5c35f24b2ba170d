"""Detection runs stopped and continued, and run by two processes: SIGTERM mid-period then --resume ends with the
uninterrupted run's weights, to the bit; torchrun (gloo) trains, evaluates on both ranks' shares, and rank 0 alone
writes."""

from __future__ import annotations

import signal
import time

import pytest
import torch

from mdistiller.engine import worklog

from conftest import REPO, needs_gloo, run_tool, run_torchrun
from detection_runs import COCO_CONFIGS, run_dir_of, start_train, student_weights_of, tiny

pytest.importorskip("pycocotools")
pytestmark = pytest.mark.usefixtures("drop_run_files")


@pytest.mark.slow
def test_sigterm_mid_period_then_resume_is_bitwise_exact(tmp_path, coco):
    config = str(COCO_CONFIGS / "ReviewDKD-R18-R101.yaml")
    common = ["EXPERIMENT.DETERMINISTIC", "True", "DISTILLER.TEACHER", "R50-FPN"]  # an R50 teacher: cheaper
    reference_tmp = tmp_path / "reference"
    result = run_tool("train.py", "--cfg", config, *tiny(reference_tmp, coco, "R50-FPN", 4, 2, "R18-FPN"),
                      *common)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = student_weights_of(run_dir_of(reference_tmp))

    run_tmp = tmp_path / "stopped"
    args = ["--cfg", config, *tiny(run_tmp, coco, "R50-FPN", 4, 2, "R18-FPN"), *common]
    log = tmp_path / "train.log"
    proc = start_train(args, log)
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
    final = student_weights_of(run_dir)
    assert final.keys() == reference.keys()
    for key in reference:
        assert torch.equal(final[key], reference[key]), key
    assert [b["epoch"] for b in worklog.read(str(run_dir))] == [1, 2]



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
