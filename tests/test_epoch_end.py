"""The end of an epoch is one ordered list (engine/epoch_end.py): the declared order of its steps, and the order in
which a real run writes its files (worklog block, student files, `epoch_<n>`, `best`, `latest` last) that exact
resume depends on."""

from __future__ import annotations

import os

import pytest

from mdistiller.cli import train as train_tool
from mdistiller.engine import epoch_end, run_checkpoints, worklog

from conftest import REPO, run_overrides

VANILLA = str(REPO / "configs/cifar100/vanilla/resnet8.yaml")

DECLARED = ["evaluate", "record_best", "collect_metrics", "write_metrics", "build_checkpoints", "write_worklog",
            "save_student", "save_periodic", "save_best", "save_latest", "log_line", "check_signals"]


def test_the_steps_are_declared_in_the_order_resume_needs():
    names = [step.__name__ for step in epoch_end.EPOCH_END_STEPS]
    assert names == DECLARED
    # what the ordering rests on, stated apart from the exact list: a new step must keep these
    position = {name: i for i, name in enumerate(names)}
    assert names[0] == "evaluate" and names[-1] == "check_signals"
    assert position["build_checkpoints"] < position["write_worklog"]  # every file of the epoch holds one state
    assert (position["write_worklog"] < position["save_student"] < position["save_periodic"] < position["save_best"]
            < position["save_latest"])
    assert all(position[n] < position["save_latest"] for n in names if n.startswith(("save_", "write_")) and
               n != "save_latest"), "`latest` must be the last file written"


def test_a_real_run_writes_worklog_students_epoch_n_best_and_latest_last(tmp_path, cifar100_tiny_root, monkeypatch):
    events: list[str] = []
    real_save, real_append, real_write = run_checkpoints.save_checkpoint, worklog.append, worklog.MetricWriters.write

    def save(obj, path):
        events.append(os.path.basename(path))
        real_save(obj, path)

    def append(run_dir, text):
        events.append("worklog.txt")
        real_append(run_dir, text)

    def write(self, epoch, lr, metrics):
        events.append("writers")
        real_write(self, epoch, lr, metrics)

    def recorded(step):
        def run(trainer, end):
            events.append(f"step {step.__name__}")
            step(trainer, end)
        return run

    monkeypatch.setattr(run_checkpoints, "save_checkpoint", save)
    monkeypatch.setattr(worklog, "append", append)
    monkeypatch.setattr(worklog.MetricWriters, "write", write)
    monkeypatch.setattr(epoch_end, "EPOCH_END_STEPS", tuple(recorded(s) for s in epoch_end.EPOCH_END_STEPS))

    result = train_tool.main(["--cfg", VANILLA, *run_overrides(tmp_path, cifar100_tiny_root), "SOLVER.EPOCHS", "2",
                              "SOLVER.BATCH_SIZE", "16", "LOG.SAVE_CHECKPOINT_FREQ", "2"])

    logged = worklog.read(result["run_dir"])
    second_is_best = logged[1]["test_acc"] > logged[0]["test_acc"]
    steps = [f"step {name}" for name in DECLARED]

    def epoch(n: int, is_best: bool) -> list[str]:
        """What the end of epoch n does, in order: the trainer runs the declared steps, and they write the files."""
        return [*steps[:4], "writers", *steps[4:6], "worklog.txt", steps[6], "student_latest", steps[7],
                *([f"epoch_{n}", f"student_{n}"] if n % 2 == 0 else []), steps[8],
                *(["best", "student_best"] if is_best else []), steps[9], "latest", *steps[10:]]

    # the first epoch is always the best so far; epoch_<n> every 2 epochs; the finished run's best_acc line at the end
    assert events == [*epoch(1, True), *epoch(2, second_is_best), "worklog.txt"]
    files = [e for e in events if not e.startswith(("step ", "writers"))]
    assert files[:6] == ["worklog.txt", "student_latest", "best", "student_best", "latest", "worklog.txt"]
    assert files[-2:] == ["latest", "worklog.txt"]
    assert os.path.isfile(os.path.join(result["run_dir"], "epoch_2"))
    assert not os.path.exists(os.path.join(result["run_dir"], "epoch_1"))


class Killed(BaseException):
    """Stands in for a SIGKILL: nothing after it runs, no handler catches it."""


def test_a_run_killed_before_its_first_latest_starts_afresh_with_a_clean_worklog(tmp_path, cifar100_tiny_root,
                                                                                 monkeypatch):
    args = ["--cfg", VANILLA, *run_overrides(tmp_path, cifar100_tiny_root), "SOLVER.BATCH_SIZE", "16"]

    def killed(trainer, end):
        raise Killed

    steps = epoch_end.EPOCH_END_STEPS
    cut = [s.__name__ for s in steps].index("save_latest")  # killed after the worklog block and the students
    monkeypatch.setattr(epoch_end, "EPOCH_END_STEPS", (*steps[:cut], killed))
    with pytest.raises(Killed):
        train_tool.main(args)
    monkeypatch.setattr(epoch_end, "EPOCH_END_STEPS", steps)
    run_dir = next((tmp_path / "output").glob("*/*"))
    assert not (run_dir / "latest").exists() and (run_dir / "student_latest").exists()
    assert [b["epoch"] for b in worklog.read(str(run_dir))] == [1]
    result = train_tool.main(args)  # no `latest`: a fresh run, as a user (or a sweep) starts it again
    text = (run_dir / "worklog.txt").read_text()
    assert result["run_dir"] == str(run_dir) and text.count("epoch: 1") == 1 and text.count("best_acc\t") == 1
