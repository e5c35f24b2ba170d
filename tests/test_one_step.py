"""The bench times the step that trains: `Trainer.train_step` is the one function both `train_epoch` and
tools/bench.py run, and every forward and update of either goes through it."""

from __future__ import annotations

import collections
import inspect

import pytest

from mdistiller.cli import bench
from mdistiller.cli import train as train_tool
from mdistiller.engine.trainer import Trainer

from conftest import REPO, run_overrides

VANILLA = str(REPO / "configs/cifar100/vanilla/resnet8.yaml")


@pytest.fixture
def counted(monkeypatch):
    """Counts of train_step / forward_step / update calls by the code that called train_step."""
    calls = collections.Counter()
    step, forward = Trainer.train_step, Trainer.forward_step

    def train_step(self, *args, **kwargs):
        caller = inspect.stack()[1]
        calls[f"train_step from {caller.function}"] += 1
        calls["inside"] += 1
        update = self.update
        self.update = lambda losses: (calls.__setitem__("update", calls["update"] + 1), update(losses))
        try:
            return step(self, *args, **kwargs)
        finally:
            self.update = update
            calls["inside"] -= 1

    def forward_step(self, *args, **kwargs):
        calls["forward_step inside train_step" if calls["inside"] else "forward_step elsewhere"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    monkeypatch.setattr(Trainer, "forward_step", forward_step)
    return calls


def test_training_and_the_bench_run_the_same_step(tmp_path, cifar100_tiny_root, counted):
    train_tool.main(["--cfg", VANILLA, *run_overrides(tmp_path, cifar100_tiny_root), "SOLVER.BATCH_SIZE", "16"])
    trained = dict(counted)
    assert trained["train_step from train_epoch"] == 4  # 64 images / 16
    bench.main(["--device", "cpu", "--tiny", "--data", "synthetic", "--synthetic-size", "64", "--steps", "2",
                "--warmup", "1", "--rows", "ours", "--opts", "SOLVER.BATCH_SIZE", "16"])
    assert counted["train_step from step"] == 3  # RowRun.step: 1 warm-up + 2 timed
    steps = counted["train_step from train_epoch"] + counted["train_step from step"]
    # every forward and every update of both ran inside that one function
    assert counted["forward_step inside train_step"] == counted["update"] == steps
    assert counted["forward_step elsewhere"] == 0
