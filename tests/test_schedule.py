"""The trainer's schedules and the detectron2 recipe's optimizer pieces: the iteration schedule's LR against hand
values of detectron2's WarmupMultiStepLR, its periods, the epoch schedule unchanged, the keys each refuses, and the
norm-layer weight-decay groups."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from mdistiller.engine.cfg import CFG, default_cfg
from mdistiller.engine.optim import build_optimizer, iteration_learning_rate, learning_rate, norm_parameter_groups
from mdistiller.engine.schedule import EpochSchedule, IterationSchedule, build_schedule, check_schedule
from mdistiller.errors import MdistillerError


def _iteration_cfg(**solver):
    cfg = default_cfg()
    cfg.DATASET.TYPE = "coco"
    values = {"MAX_ITER": 180000, "LR": 0.01, "LR_DECAY_ITERS": [120000, 160000], "LR_DECAY_RATE": 0.1,
              "WARMUP_ITERS": 1000, "WARMUP_FACTOR": 0.001, "CHECKPOINT_PERIOD": 5000, **solver}
    for key, value in values.items():
        cfg.SOLVER[key] = value
    return cfg


@pytest.mark.parametrize("iteration, expected", [
    (0, 0.01 * 0.001),  # warm-up starts at LR x WARMUP_FACTOR
    (500, 0.01 * (0.001 * 0.5 + 0.5)),
    (999, 0.01 * (0.001 * (1 - 0.999) + 0.999)),
    (1000, 0.01),  # warm-up over
    (119999, 0.01),
    (120000, 0.001),  # the step applies at the boundary iteration itself (bisect_right)
    (159999, 0.001),
    (160000, 0.0001),
    (179999, 0.0001),
])
def test_iteration_lr_is_detectron2s_warmup_multistep(iteration, expected):
    assert iteration_learning_rate(_iteration_cfg(), iteration) == pytest.approx(expected, rel=1e-12)


def test_iteration_schedule_periods_and_step_lrs():
    cfg = _iteration_cfg(MAX_ITER=12, LR_DECAY_ITERS=[7], WARMUP_ITERS=3, CHECKPOINT_PERIOD=5, EVAL_PERIOD=10)
    schedule = build_schedule(cfg, None)
    assert isinstance(schedule, IterationSchedule)
    assert schedule.periods == 3 and [schedule.steps_in(p) for p in (1, 2, 3)] == [5, 5, 2]
    lrs = [schedule.step_lr(p, s, schedule.steps_in(p)) for p in (1, 2, 3) for s in range(1, schedule.steps_in(p) + 1)]
    assert lrs == [iteration_learning_rate(cfg, i) for i in range(12)]  # every iteration once, in order
    assert lrs[0] == pytest.approx(0.01 * 0.001) and lrs[3] == 0.01 and lrs[7] == pytest.approx(0.001)
    assert schedule.period_lr(2) == lrs[5]
    assert all(schedule.per_step_lr(p) for p in (1, 2, 3))
    assert [schedule.evaluates(p) for p in (1, 2, 3)] == [False, True, True]  # iteration 10, and the end
    assert schedule.done(3) == "iteration 12/12"


def test_epoch_schedule_is_the_epoch_lr():
    cfg = default_cfg()
    cfg.SOLVER.LR_WARMUP_EPOCHS = 2.0
    schedule = build_schedule(cfg, 10)
    assert isinstance(schedule, EpochSchedule) and schedule.periods == cfg.SOLVER.EPOCHS
    assert schedule.steps_in(3) == 10 and schedule.evaluates(1)
    assert schedule.period_lr(151) == learning_rate(cfg, 151)
    assert schedule.step_lr(1, 5, 10) == learning_rate(cfg, 1, 0.5)
    assert schedule.per_step_lr(2) and not schedule.per_step_lr(3)


def test_check_schedule_accepts_the_coco_recipe():
    check_schedule(_iteration_cfg(), CFG, "detection")
    check_schedule(default_cfg(), CFG, "classification")


@pytest.mark.parametrize("change, task, phrase", [
    ({"MAX_ITER": 0}, "detection", "trains by iterations"),
    ({}, "classification", "SOLVER.MAX_ITER is the detection task's"),
    ({"EPOCHS": 12}, "detection", "SOLVER.EPOCHS 12 is not read"),
    ({"LR_DECAY_STAGES": [8, 11]}, "detection", "SOLVER.LR_DECAY_STAGES"),
    ({"LR_DECAY_ITERS": [160000, 120000]}, "detection", "strictly increasing"),
    ({"LR_DECAY_ITERS": [180000]}, "detection", "reaches SOLVER.MAX_ITER"),
    ({"WARMUP_FACTOR": 0.0}, "detection", "WARMUP_FACTOR in (0, 1]"),
    ({"CHECKPOINT_PERIOD": 0}, "detection", "CHECKPOINT_PERIOD must be positive"),
    ({"EVAL_PERIOD": 3000}, "detection", "multiple of SOLVER.CHECKPOINT_PERIOD"),
])
def test_check_schedule_refuses(change, task, phrase):
    cfg = _iteration_cfg(**change)
    with pytest.raises(MdistillerError, match=re.escape(phrase)):
        check_schedule(cfg, CFG, task)


def test_epoch_runs_refuse_iteration_keys():
    cfg = default_cfg()
    cfg.SOLVER.WARMUP_ITERS = 100
    with pytest.raises(MdistillerError, match=r"SOLVER.WARMUP_ITERS 100 is not read by a run of SOLVER.EPOCHS"):
        check_schedule(cfg, CFG, "classification")


class _WithNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1, bias=True),
                                     nn.GroupNorm(2, 4))
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)

    def get_learnable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]


def test_norm_parameter_groups_are_detectron2s():
    model = _WithNorms()
    groups = norm_parameter_groups(model, 1e-4, 0.0)
    norm_ids = {id(p) for m in (model.student[1], model.student[3]) for p in m.parameters()}
    assert {id(p) for p in groups[1]["params"]} == norm_ids and groups[1]["weight_decay"] == 0.0
    others = {id(p) for p in groups[0]["params"]}
    assert others == {id(p) for m in (model.student[0], model.student[2]) for p in m.parameters()}  # biases decay
    assert groups[0]["weight_decay"] == 1e-4


def test_sgd_with_weight_decay_norm_leaves_norm_params_undecayed():
    torch.manual_seed(0)
    model = _WithNorms()
    cfg = default_cfg()
    cfg.SOLVER.WEIGHT_DECAY_NORM, cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.MOMENTUM = 0.0, 0.5, 0.0
    optimizer = build_optimizer(cfg, model)
    bn_weight = model.student[1].weight.detach().clone()
    conv_bias = model.student[2].bias.detach().clone()
    optimizer.zero_grad()
    for p in model.get_learnable_parameters():
        p.grad = torch.zeros_like(p)  # no loss gradient: only weight decay moves a parameter
    optimizer.step()
    assert torch.equal(model.student[1].weight, bn_weight)
    assert torch.allclose(model.student[2].bias, conv_bias * (1 - cfg.SOLVER.LR * 0.5))
    assert math.isclose(optimizer.param_groups[0]["weight_decay"], 0.5)


