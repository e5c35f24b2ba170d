"""Every configs/coco recipe (upstream's nine and the baselines) through tools/train.py: one iteration on tiny images,
finite losses, COCO box AP at the end."""

from __future__ import annotations

import pytest
import torch

from mdistiller.cli import train as train_tool
from mdistiller.engine import worklog

from detection_runs import COCO_CONFIGS, roles, run_dir_of, tiny

pytest.importorskip("pycocotools")
pytestmark = pytest.mark.usefixtures("drop_run_files")


@pytest.mark.slow
# Baseline-R18 runs in test_detection_train.py (its student_best through tools/eval.py)
@pytest.mark.parametrize("config", sorted(p.name for p in COCO_CONFIGS.glob("*.yaml") if p.name != "Baseline-R18.yaml"))
def test_every_coco_recipe_runs_a_few_iterations(tmp_path, coco, config):
    path = COCO_CONFIGS / config
    train_tool.main(["--cfg", str(path), *tiny(tmp_path, coco, max_iter=1, period=1, **roles(path))])
    (block,) = worklog.read(str(run_dir_of(tmp_path)))
    assert torch.isfinite(torch.tensor(block["train_loss"])) and "test_AP" in block
